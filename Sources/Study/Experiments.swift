import Foundation

/// The settings every job of a study shares: the data, the model, the ranks, the sample budget,
/// the recipe. `full` is the study of the README (Fashion-MNIST, ResNet-20 at a quarter width,
/// 40,000 training samples per job); `quick` is a small version for tests.
public struct StudySettings: Codable, Sendable {
    public var ranks = 4
    /// Seeds per grid point: three at least for a reported experiment (two seeds cannot tell a
    /// few points of error from noise).
    public var seeds = 3
    public var data = "fashion-mnist"
    public var model = "resnet20"
    public var width = 0.25
    /// The fixed training subset (the first N samples) and held-out subset.
    public var trainSamples: Int? = 10_000
    public var evalSamples: Int? = nil
    /// Training samples each job processes, over all ranks: steps = budget / (ranks × batch).
    public var sampleBudget = 40_000
    /// `--lr` at the reference batch 128 (the linear scaling rule sets the peak).
    public var learningRate = 0.1
    /// The "large" rate of `precise-vs-ema`.
    public var largeLearningRate = 0.8
    /// Batch Renormalization's warm-up (`syncbn-train --brn-warmup`): the fraction of the run before
    /// r and d are relaxed; nil keeps the trainer's schedule.
    public var brnWarmup: Double? = nil
    /// GroupNorm by channels per group (`--gn-channels-per-group`) instead of a number of groups.
    public var gnChannelsPerGroup: Int? = nil
    public var quick = false

    public init() {}

    public static var full: StudySettings { StudySettings() }

    public static var quickSettings: StudySettings {
        var s = StudySettings()
        s.quick = true
        s.seeds = 1
        s.data = "synthetic:train=512,heldout=256,seed=0"
        s.width = 0.125
        s.trainSamples = nil
        s.sampleBudget = 1024
        return s
    }
}

/// A point of an experiment: one job, drawn at `x` in `series`.
public struct StudyPoint: Codable, Sendable {
    public var series: String
    public var x: Double
    public var seed: Int
    public var job: StudyJob

    public init(series: String, x: Double, seed: Int, job: StudyJob) {
        self.series = series
        self.x = x
        self.seed = seed
        self.job = job
    }
}

/// How a panel is drawn and tabulated.
public enum PanelKind: String, Codable, Sendable {
    /// Final held-out error against x, one line per series (EMA and PreciseBN statistics in
    /// two subplots).
    case final
    /// Final held-out error against x, with EMA and PreciseBN statistics as two series of
    /// each job.
    case statistics
    /// Held-out error against step, for every evaluation of each job (x is unused).
    case curves
    /// PreciseBN held-out error of `precise` jobs against their sample budget.
    case budget
    /// Diagnostics (weight norms and CBN's window measurements) of each job against x.
    case diagnostics
    /// Training error against held-out error per series (x is unused): information leakage.
    case leakage
    /// PreciseBN held-out error of `precise` jobs, x a setting of training and each series a way
    /// of recomputing the statistics (an interaction plot of the two).
    case crossed
}

public struct StudyPanel: Codable, Sendable {
    public var name: String
    public var title: String
    public var kind: PanelKind
    public var xLabel: String
    /// linear, log2 or log10.
    public var xScale: String
    public var points: [StudyPoint]
    /// The error on one domain's held-out samples only (data with domain labels), instead of all.
    public var domain: Int?

    public init(name: String, title: String, kind: PanelKind, xLabel: String, xScale: String, points: [StudyPoint], domain: Int? = nil) {
        self.name = name
        self.title = title
        self.kind = kind
        self.xLabel = xLabel
        self.xScale = xScale
        self.points = points
        self.domain = domain
    }
}

public struct StudyExperiment: Codable, Sendable {
    public var name: String
    public var title: String
    /// The claim from the literature the experiment tests.
    public var claim: String
    public var panels: [StudyPanel]

    public init(name: String, title: String, claim: String, panels: [StudyPanel]) {
        self.name = name
        self.title = title
        self.claim = claim
        self.panels = panels
    }

    public var jobs: [StudyJob] { panels.flatMap { $0.points.map(\.job) } }
}

/// The named experiments and their grids.
public enum StudyCatalog {
    public static let names = ["small-batch", "cbn-window", "cbn-burnin", "cbn-rho", "precise-vs-ema", "norm-batch", "leakage", "domain",
                               "e1-collapse", "e2-matched", "e3-compensation", "e4-burnin", "e5-precise", "e6-ushape", "e7-frozen", "e8-domains"]

    public static func experiments(_ s: StudySettings) -> [StudyExperiment] {
        names.map { experiment($0, s)! }
    }

    /// The options of a training job with `batch` samples per rank and the study's recipe.
    static func base(_ s: StudySettings, batch: Int, seed: Int) -> [String: String] {
        let steps = max(1, s.sampleBudget / (s.ranks * batch))
        var options: [String: String] = [
            "model": s.model, "width": format(s.width), "data": s.data, "batch-size": "\(batch)", "steps": "\(steps)",
            "lr": format(s.learningRate), "seed": "\(seed)", "log-every": "\(max(1, steps / 100))", "eval-stats": "both",
        ]
        if let n = s.trainSamples { options["train-samples"] = "\(n)" }
        if let n = s.evalSamples { options["eval-samples"] = "\(n)" }
        return options
    }

    /// The norm's own options the settings fix (Batch Renorm's warm-up, GroupNorm's grouping).
    static func normOptions(_ options: [String: String], _ s: StudySettings) -> [String: String] {
        var o = options
        if o["norm"] == "brn", let w = s.brnWarmup { o["brn-warmup"] = format(w) }
        if o["norm"] == "gn", let c = s.gnChannelsPerGroup { o["gn-channels-per-group"] = "\(c)" }
        return o
    }

    /// `--lr` (at the reference batch 128) that gives the peak rate `peak` at `batch` per rank.
    static func referenceRate(peak: Double, batch: Int, _ s: StudySettings) -> Double {
        peak * 128 / Double(batch * s.ranks)
    }

    static func steps(_ options: [String: String]) -> Int { Int(options["steps"]!)! }

    public static func format(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int(value)) : String(value)
    }

    /// Per-rank statistics with the given norm (`bn`, or a synced norm with sync group 1).
    static func perRank(_ options: [String: String], norm: String) -> [String: String] {
        var o = options
        o["norm"] = norm
        if norm != "bn" && norm != "gn" { o["sync-group-size"] = "1" }
        return o
    }

    /// Per-rank BN normalizing ghost batches of `size` samples inside the per-rank `batch` (plain
    /// per-rank BN when `size` is the batch).
    static func ghost(_ options: [String: String], size: Int, batch: Int) -> [String: String] {
        var o = options
        o["norm"] = "bn"
        if size < batch { o["ghost-batch-size"] = "\(size)" }
        return o
    }

    /// A normalization batch of `size` samples at `batch` per rank on `ranks` ranks: ghost BN up to
    /// the per-rank batch, SyncBN over size / batch consecutive ranks beyond it.
    static func normalizationBatch(_ options: [String: String], size: Int, batch: Int, ranks: Int) -> [String: String] {
        if size <= batch { return ghost(options, size: size, batch: batch) }
        var o = options
        o["norm"] = "syncbn"
        if size / batch < ranks { o["sync-group-size"] = "\(size / batch)" }
        return o
    }

    /// FrozenBN for the last 20 % of the run: the statistics frozen after 80 % of its steps.
    static func frozenForLastFifth(_ options: [String: String]) -> [String: String] {
        var o = options
        o["freeze-bn-after"] = "\(Int((Double(steps(options)) * 0.8).rounded()))"
        return o
    }

    /// Cross-iteration BN with per-rank statistics.
    static func cbn(_ options: [String: String], window: Int, rho: Double, burnInFraction: Double,
                    compensatedGradient: Bool = false) -> [String: String] {
        var o = perRank(options, norm: "cbn")
        o["cbn-window"] = "\(window)"
        o["cbn-rho"] = format(rho)
        o["cbn-burnin"] = "\(Int((Double(steps(options)) * burnInFraction).rounded()))"
        // Named either way, so that a change of the trainer's default changes no job.
        o["cbn-gradient"] = compensatedGradient ? "compensated" : "current"
        return o
    }

    /// PreciseBN re-evaluations of the checkpoints of `parents`, one job per sample budget (x).
    static func budgetPoints(_ series: String, of parents: [StudyPoint], budgets: [Double], _ s: StudySettings,
                             options extra: [String: String] = [:]) -> [StudyPoint] {
        parents.flatMap { point in
            budgets.map { n in
                StudyPoint(series: series, x: n, seed: point.seed,
                           job: StudyJob(kind: .precise, ranks: s.ranks, options: ["precise-bn-samples": format(n)].merging(extra) { $1 }, parent: point.job))
            }
        }
    }

    /// The CBN window the CBN paper pairs with a batch: about 32 samples per window (k = 32 / b, at most 16).
    public static func window(forBatch batch: Int) -> Int { max(1, min(16, 32 / batch)) }

    static let cbnBatch = 4, cbnWindow = 8, cbnBurnIn = 0.25

    /// The model of E1's cell that met its criterion (ghost batches of 2 at least 3 points worse
    /// than 32 in each seed): where E2 and E7 run, whatever `--model` says.
    static let collapseModel = "resnet56"

    public static func experiment(_ name: String, _ s: StudySettings) -> StudyExperiment? {
        let seeds = Array(1...max(1, s.seeds))
        func job(_ options: [String: String]) -> StudyJob { StudyJob(ranks: s.ranks, options: normOptions(options, s)) }
        func points(_ series: String, _ xs: [Double], _ make: (Double, Int) -> [String: String]) -> [StudyPoint] {
            xs.flatMap { x in seeds.map { seed in StudyPoint(series: series, x: x, seed: seed, job: job(make(x, seed))) } }
        }
        let q = s.quick
        switch name {
        case "small-batch":
            let batches: [Double] = q ? [8, 2] : [32, 16, 8, 4, 2]
            var p: [StudyPoint] = []
            p += points("BN (per rank)", batches) { b, seed in perRank(base(s, batch: Int(b), seed: seed), norm: "bn") }
            p += points("GN", batches) { b, seed in perRank(base(s, batch: Int(b), seed: seed), norm: "gn") }
            p += points("BRN (per rank)", batches) { b, seed in perRank(base(s, batch: Int(b), seed: seed), norm: "brn") }
            p += points("naive CBN, rho 0 (per rank)", batches) { b, seed in
                cbn(base(s, batch: Int(b), seed: seed), window: window(forBatch: Int(b)), rho: 0, burnInFraction: cbnBurnIn)
            }
            p += points("CBN (per rank)", batches) { b, seed in
                cbn(base(s, batch: Int(b), seed: seed), window: window(forBatch: Int(b)), rho: 1, burnInFraction: cbnBurnIn)
            }
            p += points("CBN, compensated gradient (per rank)", batches) { b, seed in
                cbn(base(s, batch: Int(b), seed: seed), window: window(forBatch: Int(b)), rho: 1, burnInFraction: cbnBurnIn,
                    compensatedGradient: true)
            }
            p += points("SyncBN (\(s.ranks) ranks)", batches) { b, seed in
                var o = base(s, batch: Int(b), seed: seed); o["norm"] = "syncbn"; return o
            }
            return StudyExperiment(
                name: name, title: "Error against per-rank batch",
                claim: "Per-rank BN collapses at ≤ 4 samples per rank; CBN with a window of k = 32/b iterations stays near BN at 32 per rank; GroupNorm is flat in the batch size and below BN at large batch; Batch Renorm beats BN at micro-batches of 2–4 (Yao et al. 2021; Wu & He 2018; Ioffe 2017).",
                panels: [StudyPanel(name: "error", title: "Held-out error against per-rank batch", kind: .final,
                                    xLabel: "samples per rank", xScale: "log2", points: p)])
        case "cbn-window":
            let windows: [Double] = q ? [1, 2] : [1, 2, 4, 8, 16]
            var p: [StudyPoint] = []
            for rho in [1.0, 0.0] {
                p += points(rho == 0 ? "naive (rho 0)" : "CBN (rho 1)", windows) { k, seed in
                    cbn(base(s, batch: cbnBatch, seed: seed), window: Int(k), rho: rho, burnInFraction: cbnBurnIn)
                }
            }
            p += points("CBN, compensated gradient (rho 1)", windows) { k, seed in
                cbn(base(s, batch: cbnBatch, seed: seed), window: Int(k), rho: 1, burnInFraction: cbnBurnIn, compensatedGradient: true)
            }
            return StudyExperiment(
                name: name, title: "CBN window length at \(cbnBatch) samples per rank",
                claim: "At small batch, a longer window helps CBN; naive averaging without the Taylor compensation (rho 0) is worse, and worse the longer the window (Yao et al. 2021, Table 3). Here also: whether letting the gradient flow through the compensation term (--cbn-gradient compensated) keeps the weight norms, and the accuracy, at BN's.",
                panels: [StudyPanel(name: "error", title: "Held-out error against CBN window (b = \(cbnBatch) per rank, burn-in \(Int(cbnBurnIn * 100)) %)",
                                    kind: .final, xLabel: "window k (iterations)", xScale: "log2", points: p),
                         StudyPanel(name: "diagnostics", title: "Weight and γ norms at the end of training", kind: .diagnostics,
                                    xLabel: "window k (iterations)", xScale: "log2", points: p)])
        case "cbn-burnin":
            let fractions: [Double] = q ? [0, 0.25] : [0, 0.1, 0.25, 0.5]
            let p = points("CBN (k = \(cbnWindow))", fractions.map { $0 * 100 }) { percent, seed in
                cbn(base(s, batch: cbnBatch, seed: seed), window: cbnWindow, rho: 1, burnInFraction: percent / 100)
            } + points("CBN (k = 2)", fractions.map { $0 * 100 }) { percent, seed in
                cbn(base(s, batch: cbnBatch, seed: seed), window: 2, rho: 1, burnInFraction: percent / 100)
            }
            return StudyExperiment(
                name: name, title: "CBN burn-in at \(cbnBatch) samples per rank",
                claim: "Too short a burn-in (plain BN before the window is used) hurts CBN: early in training the weights change too fast for the compensation (Yao et al. 2021, Table 4).",
                panels: [StudyPanel(name: "error", title: "Held-out error against burn-in (b = \(cbnBatch) per rank)", kind: .final,
                                    xLabel: "burn-in (% of training)", xScale: "linear", points: p),
                         StudyPanel(name: "diagnostics", title: "Weight and γ norms at the end of training", kind: .diagnostics,
                                    xLabel: "burn-in (% of training)", xScale: "linear", points: p)])
        case "cbn-rho":
            let rhos: [Double] = q ? [0, 1] : [0, 0.5, 1, 2]
            let p = points("CBN (k = \(cbnWindow))", rhos) { rho, seed in
                cbn(base(s, batch: cbnBatch, seed: seed), window: cbnWindow, rho: rho, burnInFraction: cbnBurnIn)
            }
            return StudyExperiment(
                name: name, title: "Scale of CBN's Taylor compensation",
                claim: "The first-order compensation (rho 1) is what makes old statistics usable; without it (rho 0) accuracy drops (Yao et al. 2021, Table 3).",
                panels: [StudyPanel(name: "error", title: "Held-out error against rho (b = \(cbnBatch) per rank, k = \(cbnWindow))", kind: .final,
                                    xLabel: "rho (compensation scale)", xScale: "linear", points: p)])
        case "precise-vs-ema":
            let batch = q ? 8 : 32
            var curves: [StudyPoint] = []
            for (label, lr) in [("lr \(format(s.learningRate))", s.learningRate), ("lr \(format(s.largeLearningRate))", s.largeLearningRate)] {
                curves += points("SyncBN, \(label)", [0]) { _, seed in
                    var o = base(s, batch: batch, seed: seed)
                    o["norm"] = "syncbn"
                    o["lr"] = format(lr)
                    o["eval-every"] = "\(max(1, steps(o) / (q ? 2 : 10)))"
                    return o
                }
            }
            let budgets: [Double] = q ? [32, 128] : [128, 512, 2048, 8192]
            let budget = budgetPoints("PreciseBN (SyncBN, b = \(batch) per rank)",
                                      of: curves.filter { $0.series.hasSuffix("lr \(format(s.learningRate))") }, budgets: budgets, s)
            let batches: [Double] = q ? [8, 2] : [32, 8, 2]
            let small = points("BN (per rank)", batches) { b, seed in perRank(base(s, batch: Int(b), seed: seed), norm: "bn") }
            return StudyExperiment(
                name: name, title: "PreciseBN against EMA statistics",
                claim: "PreciseBN is at least as good as the EMA and much steadier when the lr or batch is large; its estimate saturates at 10³–10⁴ samples; at per-GPU batch 2 it beats the EMA by several points (Wu & Johnson 2021, §3).",
                panels: [StudyPanel(name: "curves", title: "Held-out error during training", kind: .curves,
                                    xLabel: "step", xScale: "linear", points: curves),
                         StudyPanel(name: "budget", title: "PreciseBN sample budget (lr \(format(s.learningRate)))", kind: .budget,
                                    xLabel: "samples used for the population statistics", xScale: "log10", points: budget),
                         StudyPanel(name: "batch", title: "Per-rank BN: EMA against PreciseBN statistics", kind: .statistics,
                                    xLabel: "samples per rank", xScale: "log2", points: small)])
        case "norm-batch":
            let batch = q ? 8 : 32
            let total = batch * s.ranks
            let sizes: [Double] = (q ? [2, 8, Double(total)] : [2, 4, 8, 16, 32, 64, 128]).filter { $0 <= Double(total) }
            func normalized(_ g: Double, seed: Int) -> [String: String] {
                normalizationBatch(base(s, batch: batch, seed: seed), size: Int(g), batch: batch, ranks: s.ranks)
            }
            var p = points("BN", sizes) { g, seed in normalized(g, seed: seed) }
            p += points("BN, FrozenBN for the last 20 %", sizes.filter { $0 <= 4 || q }) { g, seed in
                frozenForLastFifth(normalized(g, seed: seed))
            }
            return StudyExperiment(
                name: name, title: "Normalization batch size at a fixed total batch of \(total)",
                claim: "Error against the normalization batch size is U-shaped, best around 32–128; FrozenBN (population statistics) for the last ~20 % of training helps at small normalization batches (Wu & Johnson 2021, §3 and §5).",
                panels: [StudyPanel(name: "error", title: "Held-out error against normalization batch (total batch \(total))", kind: .final,
                                    xLabel: "normalization batch (samples)", xScale: "log2", points: p)])
        case "leakage":
            let batch = q ? 4 : 8
            func sampled(_ norm: String, sampler: String, shuffle: Bool = false, seed: Int) -> [String: String] {
                var o = base(s, batch: batch, seed: seed)
                o["norm"] = norm
                o["sampler"] = sampler
                if shuffle { o["shuffle-bn"] = "" }
                return o
            }
            var p = points("BN (per rank), random batches", [0]) { _, seed in sampled("bn", sampler: "random", seed: seed) }
            p += points("BN (per rank), class-sorted", [1]) { _, seed in sampled("bn", sampler: "class-sorted", seed: seed) }
            p += points("SyncBN, class-sorted", [2]) { _, seed in sampled("syncbn", sampler: "class-sorted", seed: seed) }
            p += points("ShuffleBN, class-sorted", [3]) { _, seed in sampled("bn", sampler: "class-sorted", shuffle: true, seed: seed) }
            return StudyExperiment(
                name: name, title: "Information leakage through per-rank statistics (\(batch) per rank, class-sorted ranks)",
                claim: "When the samples that share statistics are correlated (here each rank's batch holds few classes), per-rank BN leaks label information: training accuracy is high and held-out accuracy poor. SyncBN and shuffling samples across ranks before BN (ShuffleBN, as MoCo) remove it (Wu & Johnson 2021, §6; He et al. 2020).",
                panels: [StudyPanel(name: "leakage", title: "Training and held-out error", kind: .leakage,
                                    xLabel: "setting", xScale: "linear", points: p)])
        case "domain":
            let batches: [Double] = [q ? 8 : 32]
            func mixed(_ norm: String, perDomain: Bool, batch: Int, seed: Int) -> [String: String] {
                var o = base(s, batch: batch, seed: seed)
                o["data"] = "two-domain:" + s.data
                o["norm"] = norm
                if perDomain { o["domain-bn"] = "" }
                return o
            }
            var p: [StudyPoint] = []
            for (norm, label) in [("syncbn", "SyncBN"), ("bn", "BN (per rank)")] {
                p += points("\(label), shared statistics", batches) { b, seed in mixed(norm, perDomain: false, batch: Int(b), seed: seed) }
                p += points("\(label), per-domain statistics", batches) { b, seed in mixed(norm, perDomain: true, batch: Int(b), seed: seed) }
            }
            return StudyExperiment(
                name: name, title: "Batches from two domains (the data and its intensity-inverted copy)",
                claim: "When a batch mixes domains, statistics shared across them normalize neither domain well; domain-specific statistics (for training, inference and PreciseBN) do better (Wu & Johnson 2021, §5).",
                panels: [StudyPanel(name: "error", title: "Held-out error on both domains", kind: .statistics,
                                    xLabel: "samples per rank", xScale: "linear", points: p)])
        case "e1-collapse":
            // E1: is there a regime where small normalization batches collapse? Ghost BN inside a
            // fixed SGD batch of 128 (per-rank batch 128 / ranks), so only the normalization batch
            // changes, in four cells of model width × data and training length.
            let batch = max(1, 128 / s.ranks)
            // The four cells of the study's model, then ResNet-56 in the cheapest one: the fallback
            // where none of the four passes (55 BN layers to ResNet-20's 19, each adding its
            // batch-2 noise), added after the four had run.
            let cells: [(model: String?, width: Double, samples: Int?, epochs: Int)] = q ? [(nil, s.width, s.trainSamples, 2)]
                : [(nil, 0.25, 10_000, 4), (nil, 1, 10_000, 4), (nil, 0.25, 60_000, 5), (nil, 1, 60_000, 5), ("resnet56", 0.25, 10_000, 4)]
            var p: [StudyPoint] = []
            for cell in cells {
                var c = s
                if let model = cell.model { c.model = model }
                c.width = cell.width
                c.trainSamples = cell.samples
                c.sampleBudget = q ? s.sampleBudget : (cell.samples ?? 60_000) * cell.epochs
                let prefix = cell.model.map { "\($0), " } ?? ""
                let label = q ? "width \(format(cell.width))" : "\(prefix)width \(format(cell.width)), \((cell.samples ?? 0) / 1000)k × \(cell.epochs) epochs"
                p += points(label, [2, Double(batch)]) { g, seed in ghost(base(c, batch: batch, seed: seed), size: Int(g), batch: batch) }
            }
            return StudyExperiment(
                name: name, title: "E1: the collapse regime (ghost BN at an SGD batch of \(batch * s.ranks))",
                claim: "Normalization batches of 2 are much worse than 32 (Wu & Johnson 2021, §3; Yao et al. 2021). Pass criterion, fixed before the run: in a cell, error(2) − error(\(batch)) ≥ 3 points in each seed; the cells that pass are the regime the later experiments (E2, E7) run in. If no cell of ResNet-20 passes, the claim is not testable at this scale for it; the ResNet-56 cell (added after the four ResNet-20 cells had run and missed the criterion, with the same criterion) tests whether depth brings the collapse.",
                panels: [StudyPanel(name: "error", title: "Held-out error against normalization batch (SGD batch \(batch * s.ranks))", kind: .final,
                                    xLabel: "normalization batch (samples)", xScale: "log2", points: p)])
        case "e2-matched":
            // E2: every arm at one SGD batch (8 ranks × 4 = 32), so only how each normalizes
            // differs: per-rank BN (4 samples), SyncBN (32), CBN over k = 8 iterations with each
            // gradient, naive CBN (no compensation), Batch Renorm, GroupNorm, Moving Average BN;
            // statistics per rank for all but SyncBN. In E1's passing cell (ResNet-56).
            var c = s
            c.ranks = q ? s.ranks : 8
            if !q { c.model = collapseModel }
            let batch = q ? 2 : 4
            func arm(_ seed: Int) -> [String: String] { base(c, batch: batch, seed: seed) }
            let window = q ? 2 : cbnWindow
            let arms: [(String, (Int) -> [String: String])] = [
                ("SyncBN", { var o = arm($0); o["norm"] = "syncbn"; return o }),
                ("BN per rank", { perRank(arm($0), norm: "bn") }),
                ("CBN, compensated gradient", { cbn(arm($0), window: window, rho: 1, burnInFraction: cbnBurnIn, compensatedGradient: true) }),
                ("CBN, reference gradient", { cbn(arm($0), window: window, rho: 1, burnInFraction: cbnBurnIn) }),
                ("naive CBN (rho 0)", { cbn(arm($0), window: window, rho: 0, burnInFraction: cbnBurnIn, compensatedGradient: true) }),
                ("Batch Renorm", { var o = perRank(arm($0), norm: "brn"); o["brn-warmup"] = "0.25"; return o }),
                ("GroupNorm, 4 channels per group", { var o = perRank(arm($0), norm: "gn"); o["gn-channels-per-group"] = "4"; return o }),
                ("Moving Average BN", { perRank(arm($0), norm: "mabn") }),
            ]
            var p: [StudyPoint] = []
            for (label, make) in (q ? Array(arms.prefix(3)) : arms) {
                p += seeds.map { seed in StudyPoint(series: label, x: Double(batch), seed: seed, job: StudyJob(ranks: c.ranks, options: make(seed))) }
            }
            return StudyExperiment(
                name: name, title: "E2: one SGD batch for every arm (\(c.ranks) ranks × \(batch))",
                claim: "With the SGD batch held fixed, per-rank BN at \(batch) samples is clearly worse than SyncBN, and cross-iteration BN recovers SyncBN's accuracy from per-rank batches (Yao et al. 2021, Table 1). Pass criterion, fixed before the run: BN per rank at least 3 points worse than SyncBN (paired over 3 seeds, 95 % interval above zero), and CBN with the compensated gradient within 1 point of SyncBN (mean paired difference ≤ 1).",
                panels: [StudyPanel(name: "error", title: "Held-out error by normalization (SGD batch \(c.ranks * batch), \(batch) per rank)", kind: .final,
                                    xLabel: "batch per rank", xScale: "log2", points: p)])
        case "e6-ushape":
            // E6: the U-shape at an SGD batch of 512 (4 ranks × 128): normalization batches of 8
            // and 32 (ghost), 128 (per rank) and 512 (SyncBN), at full width on 10k images for 30
            // epochs, long enough for a train–test gap that the large batches' weaker noise could
            // widen (the right side of the U).
            var c = s
            let batch = q ? 16 : 128
            if !q {
                c.width = 1
                c.trainSamples = 10_000
                c.sampleBudget = 10_000 * 30
            }
            let sizes: [Double] = q ? [2, 8, 16, Double(16 * s.ranks)] : [8, 32, 128, 512]
            let p = points("BN, SGD batch \(batch * c.ranks)", sizes) { g, seed in
                normalizationBatch(base(c, batch: batch, seed: seed), size: Int(g), batch: batch, ranks: c.ranks)
            }
            return StudyExperiment(
                name: name, title: "E6: the U-shape (normalization batch at an SGD batch of \(batch * c.ranks))",
                claim: "Error against the normalization batch is U-shaped: small batches are noisy, the largest regularize less (Wu & Johnson 2021, §3). Pass criterion, fixed before the run: first, the train–test gap (held-out minus last-tenth training error) at 512 exceeds 3 points, else the right side is not testable here; then the U holds if the best of 32 and 128 is at least 1 point better than 8 and than 512, each paired over 3 seeds with its 95 % interval above zero.",
                panels: [StudyPanel(name: "error", title: "Held-out error against normalization batch (SGD batch \(batch * c.ranks))", kind: .final,
                                    xLabel: "normalization batch (samples)", xScale: "log2", points: p),
                         StudyPanel(name: "generalization", title: "Training against held-out error", kind: .leakage,
                                    xLabel: "normalization batch (samples)", xScale: "log2", points: p)])
        case "e8-domains":
            // E8: two domains a per-domain normalization can and cannot undo. Domain 1 is each
            // image at a third of its contrast (an affine change of intensity: the first BN's
            // per-domain statistics remove it) or at half its size (a change of scale: no
            // statistics remove it); SyncBN with statistics shared by the domains or per domain.
            let batch = max(1, 128 / s.ranks)
            var panels: [StudyPanel] = []
            for (shift, describe) in [("contrast", "a third of the contrast"), ("shrunk", "half the size")] {
                var p: [StudyPoint] = []
                for (perDomain, label) in [(false, "shared statistics"), (true, "per-domain statistics")] {
                    p += points(label, [Double(batch)]) { _, seed in
                        var o = base(s, batch: batch, seed: seed)
                        o["data"] = "two-domain-\(shift):" + s.data
                        o["norm"] = "syncbn"
                        if perDomain { o["domain-bn"] = "" }
                        return o
                    }
                }
                for (domain, what) in [(1, "domain 1 (changed)"), (0, "domain 0 (as it is)"), (nil, "both domains")] as [(Int?, String)] {
                    panels.append(StudyPanel(name: "\(shift)-\(domain.map { "domain\($0)" } ?? "both")",
                                             title: "Domain 1 at \(describe): error on \(what)", kind: .final,
                                             xLabel: "batch per rank (SyncBN)", xScale: "log2", points: p, domain: domain))
                }
                // The 2 × 2 of training statistics (x: 0 shared, 1 per domain) and PreciseBN's
                // statistics at inference (series: pooled over the domains, per domain), the two
                // off-diagonal cells being the inconsistent pairs; all four recomputed from each
                // training job's checkpoint with the same budget.
                // (One shift only in the quick study, which has to stay short.)
                if q && shift == "shrunk" { continue }
                var crossed: [StudyPoint] = []
                for (domains, label) in [("pooled", "PreciseBN pooled over the domains"), ("per-domain", "PreciseBN per domain")] {
                    for point in p {
                        let trainedPerDomain = point.job.options["domain-bn"] != nil
                        crossed.append(StudyPoint(series: label, x: trainedPerDomain ? 1 : 0, seed: point.seed,
                                                  job: StudyJob(kind: .precise, ranks: point.job.ranks,
                                                                options: ["precise-bn-samples": "8192", "precise-bn-domains": domains], parent: point.job)))
                    }
                }
                for (domain, what) in [(1, "domain 1 (changed)"), (nil, "both domains")] as [(Int?, String)] {
                    panels.append(StudyPanel(name: "\(shift)-crossed-\(domain.map { "domain\($0)" } ?? "both")",
                                             title: "Domain 1 at \(describe): training against inference statistics, error on \(what)", kind: .crossed,
                                             xLabel: "statistics in training (0 shared, 1 per domain)", xScale: "linear", points: crossed, domain: domain))
                }
            }
            return StudyExperiment(
                name: name, title: "E8: domains a per-domain normalization can and cannot undo",
                claim: "Batches that mix domains are better normalized with statistics per domain (Wu & Johnson 2021, §5; Chang et al. 2019). Pass criterion, fixed before the run: on the contrast-changed domain, per-domain statistics at least 1 point better than shared ones, paired over 3 seeds with a 95 % interval below zero; the shrunk domain, which no statistics can undo, is reported beside it without a prediction. The inconsistent pairs (Wu & Johnson 2021, §5.2: statistics shared in training but per domain at inference, or the reverse), criterion fixed before they ran: in each training arm and each shift, PreciseBN recomputed the way the network trained at least 1 point better on both domains together than recomputed the other way, paired over 3 seeds with a 95 % interval excluding zero.",
                panels: panels)
        case "e7-frozen":
            // E7: FrozenBN in the collapse regime: ghost batches of 2 and 4 with the statistics
            // frozen for the last 20 % of training (evaluated with the frozen statistics, the EMA),
            // in the cell of E1 that passed (ResNet-56; the study's width, data and length).
            let batch = max(1, 128 / s.ranks)
            var c = s
            if !q { c.model = collapseModel }
            var p: [StudyPoint] = []
            for frozen in [false, true] {
                p += points(frozen ? "ghost BN, frozen for the last 20 %" : "ghost BN", q ? [2] : [2, 4]) { g, seed in
                    let o = ghost(base(c, batch: batch, seed: seed), size: Int(g), batch: batch)
                    return frozen ? frozenForLastFifth(o) : o
                }
            }
            return StudyExperiment(
                name: name, title: "E7: FrozenBN at ghost batches of 2 and 4 (SGD batch \(batch * s.ranks))",
                claim: "Freezing BN's statistics (population statistics in training) for the last ~20 % of training helps small normalization batches (Wu & Johnson 2021, §5). Pass criterion, fixed before the run: frozen better than not by ≥ 1 point (EMA statistics, paired over 3 seeds, interval above zero) at ghost batch 2 or 4.",
                panels: [StudyPanel(name: "error", title: "Held-out error against ghost batch, with and without FrozenBN", kind: .final,
                                    xLabel: "normalization batch (samples)", xScale: "log2", points: p)])
        case "e3-compensation":
            // E3: can the Taylor compensation matter at all? Only where its term is a visible
            // fraction of the window's statistics (taylor_fraction ≥ 1e-3), so the peak rate, which
            // sets how far the weights move within a window, is the second axis.
            let batch = q ? 4 : 4, window = q ? 4 : 16
            let peaks: [Double] = [0.0125, 0.05]
            var p: [StudyPoint] = []
            for rho in [0.0, 1.0] {
                p += points("rho \(format(rho)), compensated gradient", peaks) { peak, seed in
                    var o = cbn(base(s, batch: batch, seed: seed), window: window, rho: rho, burnInFraction: 0.1,
                                compensatedGradient: true)
                    o["lr"] = format(referenceRate(peak: peak, batch: batch, s))
                    return o
                }
            }
            return StudyExperiment(
                name: name, title: "E3: CBN's compensation at work (b = \(batch) per rank, k = \(window), burn-in 10 %)",
                claim: "The first-order Taylor compensation (rho 1) beats naive averaging (rho 0) (Yao et al. 2021, Table 3). Pass criterion, fixed before the run: rho 1 at least 1 point better than rho 0, paired over 3 seeds with a 95 % interval above zero, in a cell whose taylor_fraction is ≥ 1e-3; where taylor_fraction < 1e-3 the two cannot differ and the claim is not testable there.",
                panels: [StudyPanel(name: "error", title: "Held-out error against peak lr (b = \(batch), k = \(window))", kind: .final,
                                    xLabel: "peak learning rate", xScale: "log2", points: p),
                         StudyPanel(name: "diagnostics", title: "CBN window measurements at the end of training", kind: .diagnostics,
                                    xLabel: "peak learning rate", xScale: "log2", points: p)])
        case "e4-burnin":
            // E4: the burn-in effect with the compensated gradient, which keeps the weight norms
            // (the reference gradient's weight growth confounded the cbn-burnin experiment).
            let fractions: [Double] = q ? [0, 0.25] : [0, 0.1, 0.25, 0.5]
            let p = points("CBN (k = \(cbnWindow)), compensated gradient", fractions.map { $0 * 100 }) { percent, seed in
                cbn(base(s, batch: cbnBatch, seed: seed), window: cbnWindow, rho: 1, burnInFraction: percent / 100,
                    compensatedGradient: true)
            }
            return StudyExperiment(
                name: name, title: "E4: CBN burn-in with the compensated gradient (b = \(cbnBatch) per rank, k = \(cbnWindow))",
                claim: "Too short a burn-in hurts CBN because early weights change too fast for the compensation (Yao et al. 2021, Table 4). Pass criteria, fixed before the run: 0 % burn-in ≥ 2 points worse than the best burn-in (paired, 3 seeds, interval above zero) → the paper's mechanism holds with the compensated gradient; a flat trend (slope interval across zero, every paired difference within noise) → the earlier burn-in effect was the reference gradient's artefact.",
                panels: [StudyPanel(name: "error", title: "Held-out error against burn-in (compensated gradient)", kind: .final,
                                    xLabel: "burn-in (% of training)", xScale: "linear", points: p),
                         StudyPanel(name: "diagnostics", title: "Weight and γ norms at the end of training", kind: .diagnostics,
                                    xLabel: "burn-in (% of training)", xScale: "linear", points: p)])
        case "e5-precise":
            // E5: PreciseBN at per-rank batch 2 (per-rank BN): how many samples its estimate needs
            // (the knee), and whether its advantage over the EMA depends on the schedule's end.
            let batch = 2
            func run(_ schedule: String, seed: Int) -> [String: String] {
                var o = perRank(base(s, batch: batch, seed: seed), norm: "bn")
                o["precise-bn-batch-size"] = "32"
                if schedule == "step" {
                    let epochs = Double(steps(o) * batch * s.ranks) / Double(s.trainSamples ?? 60_000)
                    o["lr-schedule"] = "step"
                    o["lr-milestones"] = [0.5, 0.75].map { format((epochs * $0 * 100).rounded() / 100) }.joined(separator: ",")
                }
                return o
            }
            var p: [StudyPoint] = []
            p += points("BN (per rank, b = 2), cosine", [0]) { _, seed in run("cosine", seed: seed) }
            p += points("BN (per rank, b = 2), step ×0.1 at 50 % and 75 %", [1]) { _, seed in run("step", seed: seed) }
            let budgets: [Double] = q ? [8, 32] : [8, 16, 32, 64, 128]
            let budget = budgetPoints("PreciseBN of the cosine runs, 2 samples per rank per forward", of: p.filter { $0.x == 0 },
                                      budgets: budgets, s, options: ["precise-bn-batch-size": "2"])
            return StudyExperiment(
                name: name, title: "E5: PreciseBN at 2 samples per rank",
                claim: "At per-GPU batch 2, PreciseBN beats the EMA by several points, and its estimate saturates after a modest number of samples (Wu & Johnson 2021, §3). Pass criteria, fixed before the run: PreciseBN better than the EMA by ≥ 1 point, paired over 3 seeds with the interval above zero, under each schedule (if only under cosine, the gap is the schedule's end, lr → 0, not the batch); the knee is the smallest budget within 0.5 points of the 128-sample error.",
                panels: [StudyPanel(name: "schedules", title: "EMA against PreciseBN statistics (b = 2 per rank)", kind: .statistics,
                                    xLabel: "schedule (0 cosine, 1 step)", xScale: "linear", points: p),
                         StudyPanel(name: "budget", title: "PreciseBN sample budget (cosine runs)", kind: .budget,
                                    xLabel: "samples used for the population statistics", xScale: "log2", points: budget)])
        default:
            return nil
        }
    }
}

import Foundation

/// Mean, sample standard deviation and count of one measurement over seeds.
public struct SeedStatistics: Codable, Sendable {
    public var mean: Double
    public var std: Double
    public var n: Int
    public var values: [Double]

    public init?(_ values: [Double]) {
        guard !values.isEmpty else { return nil }
        self.values = values
        n = values.count
        let mean = values.reduce(0, +) / Double(values.count)
        self.mean = mean
        std = n > 1 ? (values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(n - 1)).squareRoot() : 0
    }

    /// The mean's 95 % t interval (nil for one seed).
    public var interval: StudyStatistics.Interval? { n > 1 ? StudyStatistics.mean(values) : nil }

    /// "12.3 ± 0.4 [11.3, 13.3]": mean ± sd [95 % interval] (or "12.3" for one seed).
    public var text: String {
        guard n > 1, let interval else { return String(format: "%.1f", mean) }
        return String(format: "%.1f ± %.1f [%.1f, %.1f]", mean, std, interval.low, interval.high)
    }
}

/// The results of a study, grouped for tables and figures (`summary.json`). Errors are held-out
/// error rates in percent (100 − accuracy).
public struct StudySummary: Codable, Sendable {
    public struct Point: Codable, Sendable {
        public var x: Double
        public var ema: SeedStatistics?
        public var precise: SeedStatistics?
        public var trainLoss: SeedStatistics?
        /// Training error over the last tenth of the steps (percent).
        public var trainError: SeedStatistics?
        /// Held-out error (percent) by seed, for paired differences: EMA and PreciseBN statistics.
        public var emaBySeed: [String: Double] = [:]
        public var preciseBySeed: [String: Double] = [:]

        /// A by-seed table keyed by the seed as a number (JSON keys are strings).
        static func seeds(_ values: [String: Double]) -> [Int: Double] {
            Dictionary(uniqueKeysWithValues: values.compactMap { key, value in Int(key).map { ($0, value) } })
        }
        /// Diagnostics averaged over seeds: layer → quantity → mean.
        public var diagnostics: [String: [String: Double]]?
        public var done: Int
        public var pending: Int
        public var failures: [String]
    }

    public struct Series: Codable, Sendable {
        public var name: String
        public var points: [Point]
    }

    public struct Curve: Codable, Sendable {
        public var series: String
        public var seed: Int
        public var steps: [Int]
        public var ema: [Double]
        public var precise: [Double]
    }

    /// The first normalization layer's feeding weight norm against the step, for one job.
    public struct WeightNormCurve: Codable, Sendable {
        public var series: String
        public var x: Double
        public var seed: Int
        public var steps: [Double]
        public var norms: [Double]
    }

    public struct Panel: Codable, Sendable {
        public var name: String
        public var title: String
        public var kind: PanelKind
        public var xLabel: String
        public var xScale: String
        public var series: [Series]
        public var curves: [Curve]
        public var weightNormCurves: [WeightNormCurve]
    }

    public struct Experiment: Codable, Sendable {
        public var name: String
        public var title: String
        public var claim: String
        public var panels: [Panel]
    }

    public var settings: StudySettings
    public var experiments: [Experiment]

    public init(settings: StudySettings, experiments: [StudyExperiment], record: (String) -> StudyRecord?) {
        self.settings = settings
        self.experiments = experiments.map { experiment in
            Experiment(name: experiment.name, title: experiment.title, claim: experiment.claim, panels: experiment.panels.map { panel in
                var seriesNames: [String] = []
                for point in panel.points where !seriesNames.contains(point.series) { seriesNames.append(point.series) }
                let series = seriesNames.map { name -> Series in
                    let mine = panel.points.filter { $0.series == name }
                    var xs: [Double] = []
                    for point in mine where !xs.contains(point.x) { xs.append(point.x) }
                    return Series(name: name, points: xs.map { x in
                        let here = mine.filter { $0.x == x }
                        let records = here.map { record($0.job.key) }
                        // The accuracy the panel reads: overall, or one domain's.
                        let ema: (StudyResult) -> Double? = { result in
                            guard let d = panel.domain else { return result.emaAccuracy }
                            return result.emaDomainAccuracies.flatMap { d < $0.count ? $0[d] : nil }
                        }
                        let precise: (StudyResult) -> Double? = { result in
                            guard let d = panel.domain else { return result.preciseAccuracy }
                            return result.preciseDomainAccuracies.flatMap { d < $0.count ? $0[d] : nil }
                        }
                        var emaBySeed: [String: Double] = [:], preciseBySeed: [String: Double] = [:]
                        for (point, record) in zip(here, records) where record?.status == .ok {
                            if let a = record?.result.flatMap(ema) { emaBySeed[String(point.seed)] = 100 * (1 - a) }
                            if let a = record?.result.flatMap(precise) { preciseBySeed[String(point.seed)] = 100 * (1 - a) }
                        }
                        let ok = records.compactMap { $0?.status == .ok ? $0?.result : nil }
                        func errors(_ accuracy: (StudyResult) -> Double?) -> SeedStatistics? {
                            SeedStatistics(ok.compactMap(accuracy).map { 100 * (1 - $0) })
                        }
                        var diagnostics: [String: [String: Double]]?
                        let withDiagnostics = ok.compactMap(\.diagnostics)
                        if !withDiagnostics.isEmpty {
                            var sums: [String: [String: Double]] = [:]
                            for d in withDiagnostics { for (layer, values) in d { for (k, v) in values { sums[layer, default: [:]][k, default: 0] += v / Double(withDiagnostics.count) } } }
                            diagnostics = sums
                        }
                        return Point(x: x, ema: errors(ema), precise: errors(precise),
                                     trainLoss: SeedStatistics(ok.compactMap(\.finalTrainLoss)),
                                     trainError: SeedStatistics(ok.compactMap(\.finalTrainAccuracy).map { 100 * (1 - $0) }),
                                     emaBySeed: emaBySeed, preciseBySeed: preciseBySeed, diagnostics: diagnostics,
                                     done: ok.count, pending: records.filter { $0 == nil }.count,
                                     failures: records.compactMap { $0?.status == .failed ? $0?.error : nil })
                    })
                }
                var curves: [Curve] = []
                if panel.kind == .curves {
                    for point in panel.points {
                        guard let result = record(point.job.key)?.result else { continue }
                        let steps = Array(Set(result.evaluations.map(\.step))).sorted()
                        func values(_ statistics: String) -> [Double] {
                            steps.map { step in
                                result.evaluations.first { $0.step == step && $0.statistics == statistics }.map { 100 * (1 - $0.accuracy) } ?? .nan
                            }
                        }
                        curves.append(Curve(series: point.series, seed: point.seed, steps: steps, ema: values("ema"), precise: values("precise")))
                    }
                }
                var weightNorms: [WeightNormCurve] = []
                if panel.kind == .diagnostics {
                    for point in panel.points {
                        guard let curve = record(point.job.key)?.result?.weightNormCurve, !curve.isEmpty else { continue }
                        weightNorms.append(WeightNormCurve(series: point.series, x: point.x, seed: point.seed,
                                                           steps: curve.map { $0[0] }, norms: curve.map { $0[1] }))
                    }
                }
                return Panel(name: panel.name, title: panel.title, kind: panel.kind, xLabel: panel.xLabel, xScale: panel.xScale,
                             series: series, curves: curves, weightNormCurves: weightNorms)
            })
        }
    }

    /// Markdown tables: for each panel one row per series and one column per x, each cell the
    /// held-out error in percent (mean ± std over seeds) with EMA / PreciseBN statistics.
    public var markdown: String {
        var lines = ["# Study results", "",
                     "Held-out error in percent: mean ± standard deviation over the seeds [95 % t interval of the mean]; \"EMA / PreciseBN\" where both statistics were evaluated. Below each table: paired differences between series over the seeds they share, and the trend of each series across the grid (least-squares slope of error on x, or on log₂ x for a log axis), each with its 95 % interval; \"within noise\" where the interval contains zero.",
                     "Model \(settings.model) ×\(StudyCatalog.format(settings.width)), data \(settings.data)\(settings.trainSamples.map { " (first \($0) training samples)" } ?? ""), \(settings.ranks) ranks, \(settings.sampleBudget) training samples per job, lr \(StudyCatalog.format(settings.learningRate)) at batch 128 (linear scaling, warm-up, cosine).", ""]
        for experiment in experiments {
            lines += ["## \(experiment.name): \(experiment.title)", "", "Claim: \(experiment.claim)", ""]
            for panel in experiment.panels {
                lines += ["### \(panel.title)", ""]
                lines += table(panel)
                lines.append("")
                let tests = comparisons(panel)
                if !tests.isEmpty { lines += tests + [""] }
            }
        }
        return lines.joined(separator: "\n")
    }

    func table(_ panel: Panel) -> [String] {
        func cell(_ point: Point, statistics: String? = nil) -> String {
            var parts: [String] = []
            switch statistics {
            case "ema": parts = [point.ema?.text ?? "–"]
            case "precise": parts = [point.precise?.text ?? "–"]
            default:
                if point.ema != nil || point.precise != nil { parts = [point.ema?.text ?? "–", point.precise?.text ?? "–"] }
            }
            var text = parts.joined(separator: " / ")
            if point.pending > 0 { text += text.isEmpty ? "pending" : " (\(point.pending) pending)" }
            if !point.failures.isEmpty { text += (text.isEmpty ? "" : " ") + "(\(point.failures.count) failed)" }
            return text.isEmpty ? "–" : text
        }
        switch panel.kind {
        case .curves:
            var rows = ["| series | seed | final EMA | final PreciseBN | mean EMA − PreciseBN | largest EMA − PreciseBN | std of EMA error, 2nd half | std of PreciseBN error, 2nd half |",
                        "|---|---|---|---|---|---|---|---|"]
            for curve in panel.curves {
                let gaps = zip(curve.ema, curve.precise).map { $0 - $1 }.filter { $0.isFinite }
                let half = curve.steps.count / 2
                let emaTail = SeedStatistics(Array(curve.ema[half...]).filter(\.isFinite)), preciseTail = SeedStatistics(Array(curve.precise[half...]).filter(\.isFinite))
                rows.append(String(format: "| %@ | %d | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f |", curve.series, curve.seed,
                                   curve.ema.last ?? .nan, curve.precise.last ?? .nan,
                                   gaps.isEmpty ? Double.nan : gaps.reduce(0, +) / Double(gaps.count), gaps.max() ?? .nan,
                                   emaTail?.std ?? .nan, preciseTail?.std ?? .nan))
            }
            return rows
        case .leakage:
            var rows = ["| setting | training error (last tenth of the steps) | held-out error, EMA / PreciseBN | gap (held-out EMA − training) |",
                        "|---|---|---|---|"]
            for series in panel.series {
                for point in series.points {
                    let gap = point.ema.flatMap { e in point.trainError.map { String(format: "%.1f", e.mean - $0.mean) } } ?? "–"
                    let setting = series.points.count > 1 ? "\(series.name), \(panel.xLabel) \(StudyCatalog.format(point.x))" : series.name
                    rows.append("| \(setting) | \(point.trainError?.text ?? "–") | \(cell(point)) | \(gap) |")
                }
            }
            return rows
        case .diagnostics:
            var rows: [String] = []
            let quantities = ["weight_norm", "gamma_norm", "taylor_fraction", "dropped_fraction", "window_variance_ratio"]
            for series in panel.series {
                for point in series.points {
                    guard let d = point.diagnostics else { continue }
                    if rows.isEmpty {
                        rows = ["| series | \(panel.xLabel) | layer | " + quantities.joined(separator: " | ") + " |",
                                "|---|---|---|" + String(repeating: "---|", count: quantities.count)]
                    }
                    // The first normalization layer and the mean over all of them.
                    let first = d.keys.sorted().first!
                    var mean: [String: Double] = [:]
                    for quantity in quantities {
                        let values = d.values.compactMap { $0[quantity] }
                        if !values.isEmpty { mean[quantity] = values.reduce(0, +) / Double(values.count) }
                    }
                    for (layer, values) in [(first, d[first]!), ("mean of \(d.count) layers", mean)] {
                        rows.append("| \(series.name) | \(StudyCatalog.format(point.x)) | \(layer) | " +
                                    quantities.map { values[$0].map { String(format: "%.3g", $0) } ?? "–" }.joined(separator: " | ") + " |")
                    }
                }
            }
            return rows.isEmpty ? ["(no diagnostics recorded)"] : rows
        default:
            var xs: [Double] = []
            for series in panel.series { for point in series.points where !xs.contains(point.x) { xs.append(point.x) } }
            let header = (panel.kind == .crossed ? "| series \\ \(panel.xLabel) | " : "| series | ") + xs.map { StudyCatalog.format($0) }.joined(separator: " | ") + " |"
            var rows = [header, "|---|" + String(repeating: "---|", count: xs.count)]
            for series in panel.series {
                let statistics: [String?] = panel.kind == .statistics ? ["ema", "precise"] : [.budget, .crossed].contains(panel.kind) ? ["precise"] : [nil]
                for stats in statistics {
                    let name = series.name + (panel.kind == .statistics ? (stats == "ema" ? ", EMA" : ", PreciseBN") : "")
                    rows.append("| \(name) | " + xs.map { x in series.points.first { $0.x == x }.map { cell($0, statistics: stats) } ?? "" }
                        .joined(separator: " | ") + " |")
                }
            }
            return rows
        }
    }

    /// Paired differences of every series against the panel's first, at each x, and each
    /// series' trend across the grid, with 95 % intervals (EMA statistics; PreciseBN for budget
    /// panels). Empty for panels without a grid of final errors.
    func comparisons(_ panel: Panel) -> [String] {
        guard [.final, .statistics, .budget, .crossed].contains(panel.kind) else { return [] }
        let usePrecise = [.budget, .crossed].contains(panel.kind)
        func bySeed(_ point: Point) -> [Int: Double] { Point.seeds(usePrecise ? point.preciseBySeed : point.emaBySeed) }
        var lines: [String] = []
        if panel.series.count > 1, let reference = panel.series.first {
            var rows: [String] = []
            for series in panel.series.dropFirst() {
                for point in series.points {
                    guard let base = reference.points.first(where: { $0.x == point.x }),
                          let difference = StudyStatistics.paired(bySeed(point), bySeed(base)), difference.n > 0 else { continue }
                    rows.append("| \(series.name) − \(reference.name) | \(StudyCatalog.format(point.x)) | \(difference.n) | \(difference.text) |")
                }
            }
            if !rows.isEmpty {
                lines += ["Paired differences (\(usePrecise ? "PreciseBN" : "EMA") error, points; 95 % t interval over the shared seeds):", "",
                          "| difference | \(panel.xLabel) | seeds | mean [95 % interval] |", "|---|---|---|---|"] + rows + [""]
            }
        }
        // Along each series: its first grid point against its last, paired over the seeds, with
        // each seed's difference (criteria such as "in each seed" read off this table).
        if panel.kind == .final {
            var rows: [String] = []
            for series in panel.series where series.points.count >= 2 {
                let ordered = series.points.sorted { $0.x < $1.x }
                let (first, last) = (bySeed(ordered.first!), bySeed(ordered.last!))
                guard let difference = StudyStatistics.paired(first, last), difference.n > 0 else { continue }
                let perSeed = Set(first.keys).intersection(last.keys).sorted()
                    .map { "seed \($0): " + String(format: "%+.2f", first[$0]! - last[$0]!) }.joined(separator: ", ")
                rows.append("| \(series.name) | \(StudyCatalog.format(ordered.first!.x)) − \(StudyCatalog.format(ordered.last!.x)) | \(difference.n) | \(difference.text) | \(perSeed) |")
            }
            if !rows.isEmpty {
                lines += ["Along each series, first against last \(panel.xLabel) (\(usePrecise ? "PreciseBN" : "EMA") error, points; 95 % t interval over the shared seeds):", "",
                          "| series | \(panel.xLabel) | seeds | mean [95 % interval] | each seed |", "|---|---|---|---|---|"] + rows + [""]
            }
        }
        if panel.kind == .statistics {
            var rows: [String] = []
            for series in panel.series {
                for point in series.points {
                    guard let difference = StudyStatistics.paired(Point.seeds(point.preciseBySeed), Point.seeds(point.emaBySeed)) else { continue }
                    rows.append("| \(series.name) | \(StudyCatalog.format(point.x)) | \(difference.n) | \(difference.text) |")
                }
            }
            if !rows.isEmpty {
                lines += ["PreciseBN − EMA error (points; 95 % t interval over the seeds):", "",
                          "| series | \(panel.xLabel) | seeds | mean [95 % interval] |", "|---|---|---|---|"] + rows + [""]
            }
        }
        var trends: [String] = []
        for series in panel.series {
            var xs: [Double] = [], ys: [Double] = []
            for point in series.points {
                let x = panel.xScale == "log2" ? log2(point.x) : panel.xScale == "log10" ? log10(point.x) : point.x
                guard x.isFinite else { continue }
                for value in bySeed(point).values { xs.append(x); ys.append(value) }
            }
            guard Set(xs).count >= 3, let slope = StudyStatistics.slope(x: xs, y: ys) else { continue }
            let unit = panel.xScale == "log2" ? "per doubling of \(panel.xLabel)" : panel.xScale == "log10" ? "per decade of \(panel.xLabel)" : "per unit of \(panel.xLabel)"
            trends.append("| \(series.name) | \(slope.n) | \(slope.text) \(unit) |")
        }
        if !trends.isEmpty {
            lines += ["Trend across the grid (points of error; least squares over every seed's value):", "",
                      "| series | jobs | slope [95 % interval] |", "|---|---|---|"] + trends
        }
        return lines
    }
}

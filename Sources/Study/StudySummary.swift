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

    /// "12.3 ± 0.4" (or "12.3" for one seed).
    public var text: String {
        n > 1 ? String(format: "%.1f ± %.1f", mean, std) : String(format: "%.1f", mean)
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
                        let records = mine.filter { $0.x == x }.map { record($0.job.key) }
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
                        return Point(x: x, ema: errors(\.emaAccuracy), precise: errors(\.preciseAccuracy),
                                     trainLoss: SeedStatistics(ok.compactMap(\.finalTrainLoss)),
                                     trainError: SeedStatistics(ok.compactMap(\.finalTrainAccuracy).map { 100 * (1 - $0) }), diagnostics: diagnostics,
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
                     "Held-out error in percent, mean ± standard deviation over the seeds; \"EMA / PreciseBN\" where both statistics were evaluated.",
                     "Model \(settings.model) ×\(StudyCatalog.format(settings.width)), data \(settings.data)\(settings.trainSamples.map { " (first \($0) training samples)" } ?? ""), \(settings.ranks) ranks, \(settings.sampleBudget) training samples per job, lr \(StudyCatalog.format(settings.learningRate)) at batch 128 (linear scaling, warm-up, cosine).", ""]
        for experiment in experiments {
            lines += ["## \(experiment.name): \(experiment.title)", "", "Claim: \(experiment.claim)", ""]
            for panel in experiment.panels {
                lines += ["### \(panel.title)", ""]
                lines += table(panel)
                lines.append("")
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
                    rows.append("| \(series.name) | \(point.trainError?.text ?? "–") | \(cell(point)) | \(gap) |")
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
            let header = "| series | " + xs.map { StudyCatalog.format($0) }.joined(separator: " | ") + " |"
            var rows = [header, "|---|" + String(repeating: "---|", count: xs.count)]
            for series in panel.series {
                let statistics: [String?] = panel.kind == .statistics ? ["ema", "precise"] : panel.kind == .budget ? ["precise"] : [nil]
                for stats in statistics {
                    let name = series.name + (panel.kind == .statistics ? (stats == "ema" ? ", EMA" : ", PreciseBN") : "")
                    rows.append("| \(name) | " + xs.map { x in series.points.first { $0.x == x }.map { cell($0, statistics: stats) } ?? "" }
                        .joined(separator: " | ") + " |")
                }
            }
            return rows
        }
    }
}

import Foundation

/// The statistics the study's report states: Student-t intervals for a mean and for a paired
/// difference over seeds, and an ordinary least-squares slope with its interval for a trend
/// across a grid. Two-sided 95 % throughout; "within noise" where an interval contains zero.
public enum StudyStatistics {
    /// The 97.5 % quantile of Student's t with `df` degrees of freedom (two-sided 95 %).
    public static func t975(_ df: Int) -> Double {
        let table: [Double] = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                               2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
                               2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
        guard df >= 1 else { return .nan }
        if df <= table.count { return table[df - 1] }
        // Beyond 30: the Cornish–Fisher expansion around the normal quantile (error < 1e-3).
        let z = 1.959964, v = Double(df)
        return z + (z * z * z + z) / (4 * v) + (5 * pow(z, 5) + 16 * z * z * z + 3 * z) / (96 * v * v)
    }

    /// A value with its two-sided 95 % interval.
    public struct Interval: Codable, Sendable, Equatable {
        public var estimate: Double
        public var low: Double
        public var high: Double
        public var n: Int

        /// Whether the interval contains zero (the difference or slope is not distinguishable from none).
        public var withinNoise: Bool { !(low > 0 || high < 0) }

        public var text: String {
            guard low.isFinite && high.isFinite else { return String(format: "%+.2f (n = %d, no interval)", estimate, n) }
            return String(format: "%+.2f [%+.2f, %+.2f]%@", estimate, low, high, withinNoise ? " within noise" : "")
        }
    }

    /// The mean of `values` with the t interval (nil for no values; no interval for one).
    public static func mean(_ values: [Double]) -> Interval? {
        guard !values.isEmpty else { return nil }
        let n = values.count, m = values.reduce(0, +) / Double(n)
        guard n > 1 else { return Interval(estimate: m, low: .nan, high: .nan, n: 1) }
        let sd = (values.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(n - 1)).squareRoot()
        let half = t975(n - 1) * sd / Double(n).squareRoot()
        return Interval(estimate: m, low: m - half, high: m + half, n: n)
    }

    /// The mean paired difference a − b over the seeds both have, with its t interval.
    public static func paired(_ a: [Int: Double], _ b: [Int: Double]) -> Interval? {
        let seeds = Set(a.keys).intersection(b.keys).sorted()
        return mean(seeds.map { a[$0]! - b[$0]! })
    }

    /// The least-squares slope of y on x with its t interval (n − 2 degrees of freedom); nil with
    /// fewer than two distinct x.
    public static func slope(x: [Double], y: [Double]) -> Interval? {
        precondition(x.count == y.count, "slope: one y per x")
        let n = x.count
        guard n >= 2, Set(x).count >= 2 else { return nil }
        let mx = x.reduce(0, +) / Double(n), my = y.reduce(0, +) / Double(n)
        var sxx = 0.0, sxy = 0.0
        for i in 0..<n { sxx += (x[i] - mx) * (x[i] - mx); sxy += (x[i] - mx) * (y[i] - my) }
        let b = sxy / sxx
        guard n > 2 else { return Interval(estimate: b, low: .nan, high: .nan, n: n) }
        var sse = 0.0
        for i in 0..<n { let r = y[i] - my - b * (x[i] - mx); sse += r * r }
        let se = (sse / Double(n - 2) / sxx).squareRoot()
        let half = t975(n - 2) * se
        return Interval(estimate: b, low: b - half, high: b + half, n: n)
    }
}

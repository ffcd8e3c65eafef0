/// PreciseBN's accumulator for one BN layer (Wu & Johnson 2021, "Rethinking 'Batch' in
/// BatchNorm", arXiv 2105.07576, §3): population statistics pooled over many batches.
///
/// For batches i with per-channel count n_i, mean μ_i and biased variance σ_i², accumulate in
/// Double N = Σn_i, A = Σn_i·(μ_i − K), B = Σn_i·(σ_i² + (μ_i − K)²) around a shift K shared by
/// every rank (the layer's running mean when the pass starts, so B/N − (A/N)² does not cancel
/// when |μ| ≫ σ). Then
///
///     μ_pop = K + A/N,    σ²_pop = N/(N − 1)·(B/N − (A/N)²)
///
/// which is exactly the unbiased variance of the concatenation of all batches, for any batch
/// sizes. Accumulators of different ranks add element-wise (``packed`` / ``init(packed:shift:)``),
/// so one all-reduce over the packed vectors of all layers gives every rank the same result.
public struct PopulationStatistics: Equatable {
    public let shift: [Double]
    public private(set) var count: Double = 0
    public private(set) var shiftedMeanSum: [Double]
    public private(set) var shiftedSecondMomentSum: [Double]

    public init(shift: [Double]) {
        self.shift = shift
        shiftedMeanSum = Array(repeating: 0, count: shift.count)
        shiftedSecondMomentSum = shiftedMeanSum
    }

    /// Rebuilds an accumulator from [N, A(C), B(C)] (e.g. after an all-reduce).
    public init(packed: ArraySlice<Double>, shift: [Double]) {
        let channels = shift.count
        precondition(packed.count == 1 + 2 * channels, "packed accumulator has \(packed.count) values for \(channels) channels")
        let start = packed.startIndex
        self.shift = shift
        count = packed[start]
        shiftedMeanSum = Array(packed[(start + 1)..<(start + 1 + channels)])
        shiftedSecondMomentSum = Array(packed[(start + 1 + channels)...])
    }

    public var channels: Int { shift.count }

    /// [N, A(C), B(C)]: the values that ranks add up.
    public var packed: [Double] { [count] + shiftedMeanSum + shiftedSecondMomentSum }

    /// Adds one batch's statistics (count, mean, biased variance).
    public mutating func add(_ batch: BatchStatistics) {
        precondition(batch.mean.count == channels, "batch has \(batch.mean.count) channels, accumulator \(channels)")
        count += batch.count
        for c in 0..<channels {
            let d = batch.mean[c] - shift[c]
            shiftedMeanSum[c] += batch.count * d
            shiftedSecondMomentSum[c] += batch.count * (batch.variance[c] + d * d)
        }
    }

    /// μ_pop per channel; nil before any batch.
    public var mean: [Double]? {
        guard count > 0 else { return nil }
        return (0..<channels).map { shift[$0] + shiftedMeanSum[$0] / count }
    }

    /// The unbiased σ²_pop per channel (clamped at 0); nil with fewer than 2 values.
    public var unbiasedVariance: [Double]? {
        guard count > 1 else { return nil }
        return (0..<channels).map { c in
            let m = shiftedMeanSum[c] / count
            return max(count / (count - 1) * (shiftedSecondMomentSum[c] / count - m * m), 0)
        }
    }
}

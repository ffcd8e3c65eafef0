import Collectives
import Kernels

/// Per-channel batch statistics from shifted sums, exact for any split of the batch over ranks.
///
/// Each rank accumulates, in Double, m_r, S1 = Σ(x − K) and S2 = Σ(x − K)² per channel, with a
/// shift K that is identical on every rank of the group (the running mean). One all-reduce(SUM)
/// of the packed vector [m, S1(C), S2(C)] gives the global sums, and then
/// μ = K + S1/M and σ² = S2/M − (S1/M)² (biased, clamped at 0). Shifting keeps the subtraction
/// well conditioned when |mean| ≫ std, where Float E[x²] − E[x]² loses every digit.
public struct BatchStatistics: Equatable {
    /// M: the number of values per channel over all ranks of the group.
    public let count: Double
    public let mean: [Double]
    /// The biased variance σ² (divided by M).
    public let variance: [Double]

    public init(count: Double, mean: [Double], variance: [Double]) {
        self.count = count
        self.mean = mean
        self.variance = variance
    }

    /// Packs this rank's [m, S1(C), S2(C)] for `x` under `shift`: each sample's contribution is
    /// computed from that sample alone and the samples are added along the pairwise tree (see
    /// `BatchNormScalar.shiftedSums`), so the global sums do not depend on how the batch is split.
    public static func localSums<Scalar: BatchNormScalar>(_ x: Tensor<Scalar>, layout: ChannelLayout, shift: [Double]) -> [Double] {
        var packed = [Double](repeating: 0, count: 1 + 2 * layout.channels)
        packed[0] = Double(layout.perChannel)
        guard layout.perChannel > 0 else { return packed }
        x.scalars.withUnsafeBufferPointer { xp in
            shift.withUnsafeBufferPointer { k in
                packed.withUnsafeMutableBufferPointer { out in
                    Scalar.shiftedSums(xp, layout: layout, shift: k, into: UnsafeMutableBufferPointer(rebasing: out[1...]))
                }
            }
        }
        return packed
    }

    /// Statistics from (globally summed) packed sums; nil when the count is 0.
    public init?(packedSums packed: [Double], shift: [Double]) {
        let channels = shift.count
        precondition(packed.count == 1 + 2 * channels, "packed sums have \(packed.count) values for \(channels) channels")
        let m = packed[0]
        guard m > 0 else { return nil }
        var mean = [Double](repeating: 0, count: channels), variance = mean
        for c in 0..<channels {
            let d = packed[1 + c] / m
            mean[c] = shift[c] + d
            variance[c] = max(packed[1 + channels + c] / m - d * d, 0)
        }
        self.init(count: m, mean: mean, variance: variance)
    }

    /// Statistics of `x` over the ranks of `group` (nil: this rank only): one all-reduce.
    public static func compute<Scalar: BatchNormScalar>(_ x: Tensor<Scalar>, layout: ChannelLayout, shift: [Double],
                                                        group: (any Communicator)?) throws -> BatchStatistics? {
        var packed = localSums(x, layout: layout, shift: shift)
        if let group { try group.allReduceSum(&packed) }
        return BatchStatistics(packedSums: packed, shift: shift)
    }
}

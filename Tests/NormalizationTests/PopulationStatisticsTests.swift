import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

final class PopulationStatisticsTests: XCTestCase {
    /// Unbiased per-channel variance and mean of all values, by the definition.
    func naive(_ batches: [Tensor<Double>]) -> (mean: [Double], variance: [Double]) {
        let channels = batches[0].shape[1]
        var values = [[Double]](repeating: [], count: channels)
        for batch in batches {
            let layout = ChannelLayout(shape: batch.shape)!
            for i in 0..<batch.count { values[(i / layout.spatial) % channels].append(batch.scalars[i]) }
        }
        let mean = values.map { $0.reduce(0, +) / Double($0.count) }
        let variance = zip(values, mean).map { v, m in v.reduce(0) { $0 + ($1 - m) * ($1 - m) } / Double(v.count - 1) }
        return (mean, variance)
    }

    func testPooledEstimateEqualsTheUnbiasedVarianceOfTheConcatenationAcrossUnevenBatchesAndRanks() throws {
        // Rank r holds batches of different sizes; means differ between batches and are large.
        let sizes = [[3, 1, 5], [2], [], [4, 4]]
        var seed: UInt64 = 40
        let batches = sizes.map { rankSizes in rankSizes.map { n -> Tensor<Double> in
            seed += 1
            return randomTensor([n, 3, 2, 2], seed: seed, mean: 500 + Double(seed % 7) * 3, std: 1 + Double(seed % 3))
        } }
        let shift = [480.0, 510, 0]   // any shift shared by all ranks
        let results = try InProcessGroup.run(size: 4) { comm -> [Double] in
            var accumulator = PopulationStatistics(shift: shift)
            for batch in batches[comm.rank] {
                let layout = ChannelLayout(shape: batch.shape)!
                accumulator.add(BatchStatistics(packedSums: BatchStatistics.localSums(batch, layout: layout, shift: shift), shift: shift)!)
            }
            var packed = accumulator.packed
            try comm.allReduceSum(&packed)
            let total = PopulationStatistics(packed: packed[...], shift: shift)
            return total.mean! + total.unbiasedVariance!
        }
        let (mean, variance) = naive(batches.flatMap { $0 })
        for rank in 0..<4 {
            XCTAssertEqual(results[rank].map(\.bitPattern), results[0].map(\.bitPattern), "rank \(rank) differs")
            assertClose(Array(results[rank][0..<3]), mean, relTol: 1e-12)
            assertClose(Array(results[rank][3...]), variance, relTol: 1e-9)
        }
    }

    func testEqualBatchesReduceToTheSeedFormula() {
        // For k batches of n: σ² = N/(N−1)·[Σ(μ_i² + σ_i²)/k − (Σμ_i/k)²].
        let stats = [BatchStatistics(count: 4, mean: [1], variance: [2]), BatchStatistics(count: 4, mean: [3], variance: [0.5])]
        var accumulator = PopulationStatistics(shift: [0])
        stats.forEach { accumulator.add($0) }
        let k = 2.0, N = 8.0
        let expected = N / (N - 1) * ((1 + 2 + 9 + 0.5) / k - (4 / k) * (4 / k))
        XCTAssertEqual(accumulator.unbiasedVariance![0], expected, accuracy: 1e-12)
        XCTAssertEqual(accumulator.mean![0], 2, accuracy: 1e-12)
        XCTAssertNil(PopulationStatistics(shift: [0]).mean)
    }
}

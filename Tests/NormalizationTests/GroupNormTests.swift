import Kernels
import Normalization
import TestSupport
import XCTest

final class GroupNormTests: XCTestCase {
    /// Per sample and group of C/G channels: two-pass mean and biased variance, by the definition.
    func reference(_ x: Tensor<Double>, groups: Int, gamma: [Double], beta: [Double]) -> [Double] {
        let layout = ChannelLayout(shape: x.shape)!
        let perGroup = layout.channels / groups, span = perGroup * layout.spatial
        var y = [Double](repeating: 0, count: x.count)
        for n in 0..<layout.batch {
            for g in 0..<groups {
                let base = (n * layout.channels + g * perGroup) * layout.spatial
                let values = Array(x.scalars[base..<(base + span)])
                let mean = values.reduce(0, +) / Double(span)
                let variance = values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(span)
                for i in 0..<span {
                    let c = g * perGroup + i / layout.spatial
                    y[base + i] = gamma[c] * (values[i] - mean) / (variance + 1e-5).squareRoot() + beta[c]
                }
            }
        }
        return y
    }

    func testForwardMatchesTheDefinitionForImagesAndFeatures() throws {
        for (shape, groups) in [([3, 6, 2, 3], 3), ([4, 8], 2), ([2, 4, 3, 3], 4), ([2, 4, 2, 2], 1)] {
            let gn = GroupNorm<Double>(featureCount: shape[1], groups: groups)
            gn.weight.value.scalars = (0..<shape[1]).map { 1 + 0.1 * Double($0) }
            gn.bias.value.scalars = (0..<shape[1]).map { 0.2 * Double($0) - 0.3 }
            let x = randomTensor(shape, seed: 90, mean: 3, std: 2)
            let expected = reference(x, groups: groups, gamma: gn.weight.value.scalars, beta: gn.bias.value.scalars)
            assertClose(try gn.forward(x, mode: .training).scalars, expected, relTol: 1e-10, absTol: 1e-12, "\(shape) G=\(groups)")
            assertClose(try gn.forward(x, mode: .inference).scalars, expected, relTol: 1e-10, absTol: 1e-12, "inference is the same")
        }
    }

    func testGradientsMatchFiniteDifferences() throws {
        for (shape, groups) in [([2, 4, 2, 3], 2), ([3, 6], 3)] {
            let gn = GroupNorm<Double>(featureCount: shape[1], groups: groups)
            gn.weight.value.scalars = (0..<shape[1]).map { 1.3 - 0.2 * Double($0) }
            gn.bias.value.scalars = (0..<shape[1]).map { 0.1 * Double($0) }
            try checkGradients(of: gn, input: randomTensor(shape, seed: 91, mean: 1, std: 1.5))
        }
    }

    func testSamplesAreNormalizedIndependentlyOfTheBatch() throws {
        let gn = GroupNorm<Float>(featureCount: 4, groups: 2)
        let batch = randomTensor([5, 4, 3, 3], seed: 92).converted(to: Float.self)
        let together = try gn.forward(batch, mode: .training)
        let alone = try gn.forward(batch.slice(samples: 2..<3), mode: .training)
        XCTAssertEqual(Array(together.scalars[(2 * 36)..<(3 * 36)]), alone.scalars)
    }
}

import Kernels
import TestSupport
import XCTest

final class WeightNormTests: XCTestCase {
    func makeLayer(seed: UInt64) -> WeightNorm<Double, Conv2d<Double>> {
        var random = DeterministicRandom(seed: seed)
        let conv = Conv2d<Double>(inputChannels: 3, outputChannels: 4, kernelSize: 3, padding: 1, bias: false, random: &random)
        return WeightNorm(conv)
    }

    /// PyTorch's weight_norm(conv, dim=0) in float64: y, dx, dv, dg (../shared/golden/weightnorm).
    func testMatchesPyTorch() throws {
        let directory = fixturesDirectory() + "/weightnorm/conv3x3_2x3x5x5_to_4"
        func load(_ name: String) throws -> NumpyArray { try NumpyArray(contentsOf: directory + "/\(name).npy") }
        let layer = makeLayer(seed: 1)
        layer.direction.value = try load("v").tensor(as: Double.self)
        layer.magnitude.value.scalars = try load("g").doubles()
        let y = try layer.forward(try load("x").tensor(as: Double.self), mode: .training)
        let dx = try layer.backward(try load("dy").tensor(as: Double.self))
        for (name, actual) in [("y", y.scalars), ("dx", dx.scalars), ("dv", layer.direction.gradient.scalars), ("dg", layer.magnitude.gradient.scalars)] {
            let error = relativeError(actual, try load(name).doubles())
            XCTAssertLessThan(error, 1e-12, "\(name): max|out − ref|/max|ref| = \(error)")
        }
    }

    func testGradientsMatchFiniteDifferences() throws {
        let layer = makeLayer(seed: 2)
        for i in 0..<layer.magnitude.value.count { layer.magnitude.value.scalars[i] *= 1.5 + 0.3 * Double(i) }
        try checkGradients(of: layer, input: randomTensor([2, 3, 5, 5], seed: 3), tolerance: 1e-7)
    }

    func testStartsAsTheWrappedLayerAndNamesItsParametersAsPyTorch() throws {
        var random = DeterministicRandom(seed: 4)
        let conv = Conv2d<Double>(inputChannels: 3, outputChannels: 4, kernelSize: 3, padding: 1, bias: true, random: &random)
        let x = randomTensor([2, 3, 5, 5], seed: 5)
        let before = try conv.forward(x, mode: .training)
        let layer = WeightNorm(conv)
        assertClose(try layer.forward(x, mode: .training).scalars, before.scalars, relTol: 1e-12, absTol: 1e-14, "unchanged output")
        let names = layer.state.compactMap { if case let .parameter(name, _) = $0 { return name } else { return nil } }
        XCTAssertEqual(names, ["weight_g", "weight_v", "bias"])
    }
}

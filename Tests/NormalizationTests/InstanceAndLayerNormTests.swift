import Kernels
import Normalization
import TestSupport
import XCTest

/// `--norm in` and `--norm ln` are GroupNorm with C groups and with one group: checked against
/// PyTorch's F.instance_norm(affine) and LayerNorm over C×H×W (float64 reference values).
final class InstanceAndLayerNormTests: XCTestCase {
    func check<T: BatchNormScalar>(_ folder: String, groups: (Int) -> Int, as _: T.Type, tolerance: Double) throws {
        let dir = fixturesDirectory() + "/" + folder
        let x = try NumpyArray(contentsOf: dir + "/x.npy")
        let channels = x.shape[1]
        let layer = GroupNorm<T>(featureCount: channels, groups: groups(channels))
        layer.weight.value.scalars = try NumpyArray(contentsOf: dir + "/gamma.npy").doubles().map { T($0) }
        layer.bias.value.scalars = try NumpyArray(contentsOf: dir + "/beta.npy").doubles().map { T($0) }
        let y = try layer.forward(x.tensor(as: T.self), mode: .training)
        let dx = try layer.backward(try NumpyArray(contentsOf: dir + "/dy.npy").tensor(as: T.self))
        for (name, actual) in [("y", y.scalars), ("dx", dx.scalars), ("dgamma", layer.weight.gradient.scalars), ("dbeta", layer.bias.gradient.scalars)] {
            let error = relativeError(actual, try NumpyArray(contentsOf: dir + "/\(name).npy").doubles())
            XCTAssertLessThan(error, tolerance, "\(folder) \(name) in \(T.self): \(error)")
        }
        // Inference equals training (no batch statistics).
        XCTAssertEqual(try layer.forward(x.tensor(as: T.self), mode: .inference).scalars, y.scalars)
    }

    func testInstanceNormMatchesPyTorch() throws {
        for folder in ["instancenorm/nchw_4x3x5x5", "instancenorm/nchw_offset_3x2x4x4"] {
            try check(folder, groups: { $0 }, as: Double.self, tolerance: 1e-10)
            try check(folder, groups: { $0 }, as: Float.self, tolerance: 1e-5)
        }
    }

    /// InstanceNorm2d(track_running_stats=True): training normalizes each instance by itself and
    /// moves the running statistics toward the batch average of the instances' means and
    /// unbiased variances; inference normalizes with the running statistics.
    func testInstanceNormRunningStatisticsFollowPyTorch() throws {
        let layer = GroupNorm<Double>(featureCount: 2, groups: 2, trackRunningStatistics: 0.1)
        let untracked = GroupNorm<Double>(featureCount: 2, groups: 2)
        layer.weight.value.scalars = [1.5, 0.5]
        layer.bias.value.scalars = [0.2, -0.1]
        let x = randomTensor([3, 2, 4, 4], seed: 9, mean: 1.5)
        let y = try layer.forward(x, mode: .training)
        untracked.weight.value = layer.weight.value
        untracked.bias.value = layer.bias.value
        assertClose(y.scalars, try untracked.forward(x, mode: .training).scalars, relTol: 1e-12, absTol: 1e-14, "training is plain IN")
        let running = try XCTUnwrap(layer.running)
        for c in 0..<2 {
            var means: [Double] = [], variances: [Double] = []
            for n in 0..<3 {
                let values = (0..<16).map { x.scalars[(n * 2 + c) * 16 + $0] }
                let mean = values.reduce(0, +) / 16
                means.append(mean)
                variances.append(values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / 15)
            }
            XCTAssertEqual(running.mean.value.scalars[c], 0.1 * means.reduce(0, +) / 3, accuracy: 1e-12)
            XCTAssertEqual(running.variance.value.scalars[c], 0.9 + 0.1 * variances.reduce(0, +) / 3, accuracy: 1e-12)
        }
        let inference = try layer.forward(x, mode: .inference)
        let i = 17   // sample 0, channel 1, pixel 1
        let expected = 0.5 * (x.scalars[i] - running.mean.value.scalars[1]) / (running.variance.value.scalars[1] + 1e-5).squareRoot() - 0.1
        XCTAssertEqual(inference.scalars[i], expected, accuracy: 1e-12)
        XCTAssertEqual(layer.state.map(\.name), ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"])
        try checkGradients(of: GroupNorm<Double>(featureCount: 2, groups: 2, trackRunningStatistics: 0.1), input: x, tolerance: 1e-6)
    }

    func testLayerNormMatchesPyTorch() throws {
        try check("layernorm/nchw_4x3x5x5", groups: { _ in 1 }, as: Double.self, tolerance: 1e-10)
        try check("layernorm/nchw_4x3x5x5", groups: { _ in 1 }, as: Float.self, tolerance: 1e-5)
    }
}

/// IBN-Net's IBN layer: InstanceNorm on the first half of the channels, BN on the rest.
final class InstanceBatchNormTests: XCTestCase {
    func testIsInstanceNormBesideBatchNorm() throws {
        let x = randomTensor([3, 5, 4, 4], seed: 21, mean: 0.7)
        let ibn = InstanceBatchNorm<Double>(featureCount: 5, batchNorm: { BatchNorm<Double>(featureCount: $0) })
        XCTAssertEqual(ibn.instanceChannels, 2)
        ibn.instanceNorm.weight.value.scalars = [1.3, 0.7]
        ibn.batchNorm.weight.value.scalars = [0.9, 1.1, 1.2]
        let y = try ibn.forward(x, mode: .training)
        // The halves separately, by the layers the IBN is made of.
        let instance = GroupNorm<Double>(featureCount: 2, groups: 2), batch = BatchNorm<Double>(featureCount: 3)
        instance.weight.value = ibn.instanceNorm.weight.value
        batch.weight.value = ibn.batchNorm.weight.value
        let first = try instance.forward(ibn.channels(x, 0..<2), mode: .training)
        let second = try batch.forward(ibn.channels(x, 2..<5), mode: .training)
        assertClose(y.scalars, ibn.joined(first, second).scalars, relTol: 1e-14, absTol: 1e-14, "IBN = IN ‖ BN")
        for n in 0..<3 { for p in 0..<16 {   // channel 0 of sample n is IN's channel 0
            XCTAssertEqual(y.scalars[(n * 5) * 16 + p], first.scalars[(n * 2) * 16 + p])
        } }
        XCTAssertEqual(ibn.state.map(\.name), ["IN.weight", "IN.bias", "BN.weight", "BN.bias", "BN.running_mean", "BN.running_var", "BN.num_batches_tracked"])
        try checkGradients(of: InstanceBatchNorm<Double>(featureCount: 5, batchNorm: { BatchNorm<Double>(featureCount: $0) }), input: x, tolerance: 1e-6)
    }
}

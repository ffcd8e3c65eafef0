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

    func testLayerNormMatchesPyTorch() throws {
        try check("layernorm/nchw_4x3x5x5", groups: { _ in 1 }, as: Double.self, tolerance: 1e-10)
        try check("layernorm/nchw_4x3x5x5", groups: { _ in 1 }, as: Float.self, tolerance: 1e-5)
    }
}

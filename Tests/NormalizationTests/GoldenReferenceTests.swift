import Kernels
import Normalization
import TestSupport
import XCTest

/// PyTorch float64 reference values (torch.nn.functional.batch_norm, training mode, ε 1e-5,
/// momentum 0.1, running statistics from 0/1) on Float32 inputs: an outside check of the
/// conventions that a self-written reference would repeat.
final class GoldenReferenceTests: XCTestCase {
    func load(_ case: String, _ name: String) throws -> [Double] {
        try NumpyArray(contentsOf: fixturesDirectory() + "/batchnorm/\(`case`)/\(name).npy").doubles()
    }

    func check<T: BatchNormScalar>(_ case: String, as _: T.Type, tolerance: Double) throws {
        let x = try NumpyArray(contentsOf: fixturesDirectory() + "/batchnorm/\(`case`)/x.npy")
        let channels = x.shape[1]
        let bn = BatchNorm<T>(featureCount: channels)
        bn.weight.value.scalars = try load(`case`, "gamma").map { T($0) }
        bn.bias.value.scalars = try load(`case`, "beta").map { T($0) }
        let y = try bn.forward(x.tensor(as: T.self), mode: .training)
        let dy = try NumpyArray(contentsOf: fixturesDirectory() + "/batchnorm/\(`case`)/dy.npy").tensor(as: T.self)
        let dx = try bn.backward(dy)
        let results: [(String, [Double])] = [
            ("y", y.scalars.map(Double.init)), ("dx", dx.scalars.map(Double.init)),
            ("dgamma", bn.weight.gradient.scalars.map(Double.init)), ("dbeta", bn.bias.gradient.scalars.map(Double.init)),
            ("mean", bn.lastStatistics!.mean), ("var", bn.lastStatistics!.variance),
            ("running_mean", bn.runningMean.value.scalars.map(Double.init)),
            ("running_var", bn.runningVariance.value.scalars.map(Double.init)),
            ("y_inference", try bn.forward(x.tensor(as: T.self), mode: .inference).scalars.map(Double.init)),
        ]
        for (name, actual) in results {
            let error = relativeError(actual, try load(`case`, name))
            XCTAssertLessThan(error, tolerance, "\(`case`) \(name) in \(T.self): max|out − ref|/max|ref| = \(error)")
        }
    }

    func testMatchesPyTorchOnNCHWInput() throws {
        try check("nchw_6x3x4x4", as: Double.self, tolerance: 1e-12)
        try check("nchw_6x3x4x4", as: Float.self, tolerance: 1e-6)
    }

    func testMatchesPyTorchOnTwoDimensionalInput() throws {
        try check("nc_10x5", as: Double.self, tolerance: 1e-12)
        try check("nc_10x5", as: Float.self, tolerance: 1e-6)
    }

    func testMatchesPyTorchWhenTheMeanIsNearOneThousand() throws {
        // The shift is the running mean, 0 before the first batch, so Σ(x − K)² carries ~1e6 per
        // element here and Double keeps ~1e-10 of σ²: still 10⁴ below Float's own resolution.
        try check("nchw_offset_9x2x3x3", as: Double.self, tolerance: 1e-8)
        try check("nchw_offset_9x2x3x3", as: Float.self, tolerance: 1e-6)
    }
}

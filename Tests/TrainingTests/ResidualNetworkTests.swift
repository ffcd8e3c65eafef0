import Kernels
import Normalization
import TestSupport
import Training
import XCTest

/// Residual blocks and the ResNets: PyTorch reference values for torchvision's BasicBlock,
/// finite-difference gradient checks in Double, and torchvision's checkpoint names.
final class ResidualNetworkTests: XCTestCase {
    let golden = fixturesDirectory() + "/resnet_basicblock/proj_stride2_3x4x6x6_to_8"

    func reference(_ name: String) throws -> [Double] { try NumpyArray(contentsOf: golden + "/\(name).npy").doubles() }

    func batchNormBlock<T: BatchNormScalar>(_ input: Int, _ output: Int, stride: Int, as _: T.Type, seed: UInt64 = 1) throws -> ResidualBlock<T> {
        var random = DeterministicRandom(seed: seed)
        return try ResNet.basicBlock(inputChannels: input, outputChannels: output, stride: stride,
                                     norm: { channels, _ in BatchNorm<T>(featureCount: channels) }, random: &random)
    }

    /// The projection block (4→8 channels, stride 2) against PyTorch float64 on the same weights:
    /// output, input gradient, every parameter gradient and the running statistics after one step.
    func checkGolden<T: BatchNormScalar>(as type: T.Type, tolerance: Double) throws {
        let block = try batchNormBlock(4, 8, stride: 2, as: T.self)
        var entries: [String: StateEntry<T>] = [:]
        for entry in block.state { entries[entry.name] = entry }
        XCTAssertEqual(Set(entries.keys), Set(["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                                               "bn1.num_batches_tracked", "conv2.weight", "bn2.weight", "bn2.bias",
                                               "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked",
                                               "downsample.0.weight", "downsample.1.weight", "downsample.1.bias",
                                               "downsample.1.running_mean", "downsample.1.running_var",
                                               "downsample.1.num_batches_tracked"]))
        for (name, entry) in entries {
            if case let .parameter(_, p) = entry { p.value.scalars = try reference("param." + name).map { T($0) } }
        }
        let x = try NumpyArray(contentsOf: golden + "/x.npy").tensor(as: T.self)
        let dy = try NumpyArray(contentsOf: golden + "/dy.npy").tensor(as: T.self)
        let y = try block.forward(x, mode: .training)
        let dx = try block.backward(dy)
        func check(_ what: String, _ actual: [T], _ expected: [Double]) {
            let error = relativeError(actual, expected)
            XCTAssertLessThan(error, tolerance, "\(what) in \(T.self): max|out − ref|/max|ref| = \(error)")
        }
        check("y", y.scalars, try reference("y"))
        check("dx", dx.scalars, try reference("dx"))
        for (name, entry) in entries {
            switch entry {
            case let .parameter(_, p): check("grad." + name, p.gradient.scalars, try reference("grad." + name))
            case let .buffer(_, b): check(name, b.value.scalars, try reference("param." + name))
            default: break
            }
        }
    }

    func testProjectionBlockMatchesPyTorch() throws {
        try checkGolden(as: Double.self, tolerance: 1e-12)
        try checkGolden(as: Float.self, tolerance: 1e-5)
    }

    func testIdentityBlockGradients() throws {
        let block = try batchNormBlock(3, 3, stride: 1, as: Double.self)
        XCTAssertNil(block.shortcut)
        try checkGradients(of: block, input: randomTensor([4, 3, 5, 5], seed: 11), tolerance: 1e-5)
    }

    func testProjectionBlockGradients() throws {
        let block = try batchNormBlock(2, 4, stride: 2, as: Double.self)
        XCTAssertNotNil(block.shortcut)
        try checkGradients(of: block, input: randomTensor([3, 2, 6, 6], seed: 12), tolerance: 1e-5)
    }

    /// The whole ResNet-20 at width 1/8 (2/4/8 channels), 3 samples of 1×8×8, in Double.
    func testWholeResNet20Gradients() throws {
        var random = DeterministicRandom(seed: 5)
        let (stem, stages) = ModelKind.resnet20.residualStages!
        let layers: [(name: String, layer: any Layer<Double>)] = try ResNet.layers(
            stem: stem, stages: stages, inputChannels: 1, classes: 3, width: 0.125,
            norm: { channels, _ in BatchNorm<Double>(featureCount: channels) }, random: &random)
        let model = Sequential<Double>(layers)
        XCTAssertEqual(leafLayers(layers).filter { $0.layer is Conv2d<Double> }.count, 21)   // 19 3×3 + 2 projections
        try checkGradients(of: model, input: randomTensor([3, 1, 8, 8], seed: 13), tolerance: 1e-5)
    }

    /// torchvision's names, so a PyTorch user can load_state_dict(strict=True).
    func testCheckpointNamesFollowTorchvision() throws {
        let normalization = NormalizationFactory(kind: .bn, group: nil)
        let resnet20 = try Network.make(.resnet20, sampleShape: [1, 28, 28], classes: 10, normalization: normalization, seed: 0)
        let names = Set(resnet20.state.map(\.name))
        for name in ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
                     "layer1.0.conv1.weight", "layer1.2.bn2.running_var", "layer2.0.downsample.0.weight",
                     "layer2.0.downsample.1.running_mean", "layer3.2.conv2.weight", "fc.weight", "fc.bias"] {
            XCTAssertTrue(names.contains(name), name)
        }
        XCTAssertFalse(names.contains("layer1.0.downsample.0.weight"), "stage 1 keeps the shape: identity shortcut")
        XCTAssertEqual(resnet20.parameterCount, 272_186)   // CIFAR ResNet-20, projection shortcuts, 1 input channel, 10 classes
        let resnet18 = try Network.make(.resnet18, sampleShape: [3, 32, 32], classes: 10, normalization: normalization, seed: 0)
        XCTAssertEqual(resnet18.parameterCount, 11_173_962)   // torchvision resnet18 with a 3×3 stem and 10 classes
        XCTAssertTrue(resnet18.state.contains { $0.name == "layer4.1.bn2.num_batches_tracked" })
        let half = try Network.make(.resnet20, sampleShape: [1, 28, 28], classes: 10, normalization: normalization, width: 0.5, seed: 0)
        XCTAssertEqual((half.state.first { $0.name == "layer3.0.conv1.weight" }).map { entry -> [Int] in
            if case let .parameter(_, p) = entry { return p.value.shape } else { return [] } }, [32, 16, 3, 3])
    }
}

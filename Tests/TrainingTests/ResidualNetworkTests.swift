import Collectives
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

/// ResNets inside the trainer: every normalization at every norm position, world-size
/// invariance with augmentation, mid-epoch checkpoints, PreciseBN and folding.
final class ResidualTrainingTests: XCTestCase {
    static let data = try! DataSource.split(.synthetic(train: 45, heldOut: 16, seed: 4), evaluation: nil, heldOutFraction: 0.1)

    func configuration(norm: NormalizationKind = .syncbn, batch: Int, steps: Int) -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.model = .resnet20
        c.width = 0.25
        c.norm = norm
        c.batchSize = batch
        c.steps = steps
        c.seed = 8
        c.augmentation = Augmentation(crop: true, flip: true, padding: 2)
        c.precisBNForTests()
        return c
    }

    func train(_ c: TrainingConfiguration, ranks: Int, resume: String? = nil, stopAt: Int? = nil,
               checkpoint: String? = nil) throws -> (state: [String: [Float]], losses: [Double], momentum: [String: [Float]]) {
        try InProcessGroup.run(size: ranks) { comm -> ([String: [Float]], [Double], [String: [Float]]) in
            let trainer = try Trainer(configuration: c, data: Self.data, world: comm)
            if let resume { try trainer.resume(from: resume) }
            var losses: [Double] = []
            while trainer.step < (stopAt ?? trainer.totalSteps) { losses.append(try trainer.trainStep().loss) }
            if let checkpoint { try trainer.save(to: checkpoint) }
            try trainer.verifyReplicasAgree()
            return (stateDictionary(trainer.network), losses, trainer.optimizer.momentumBuffers)
        }[0]
    }

    func testEveryNormalizationTrainsAtEveryNormPosition() throws {
        var cases: [(String, TrainingConfiguration)] = NormalizationKind.allCases.map { ($0.rawValue, configuration(norm: $0, batch: 4, steps: 3)) }
        var ghost = configuration(norm: .syncbn, batch: 4, steps: 3)
        ghost.ghostBatchSize = 2
        var frozen = configuration(norm: .syncbn, batch: 4, steps: 3)
        frozen.freezeBNAfter = 2
        var grouped = configuration(norm: .syncbn, batch: 4, steps: 3)
        grouped.syncGroupSize = 1
        cases += [("ghost", ghost), ("frozen", frozen), ("group 1", grouped)]
        for (label, c) in cases {
            let result = try InProcessGroup.run(size: 2) { comm -> (Int, Int, [Double]) in
                let trainer = try Trainer(configuration: c, data: Self.data, world: comm)
                var losses: [Double] = []
                while trainer.step < trainer.totalSteps { losses.append(try trainer.trainStep().loss) }
                let evaluation = try trainer.evaluations(keepPrecise: true)
                try trainer.verifyReplicasAgree()
                // 19 norms: stem, 2 per block × 9, 2 projections.
                // An IBN is one norm made of two leaves (bn1.IN, bn1.BN).
                let norms = trainer.network.leaves.filter {
                    $0.name.hasSuffix("bn1") || $0.name.hasSuffix("bn2") || $0.name.hasSuffix("downsample.1") || $0.name.hasSuffix("bn1.BN")
                }
                return (norms.count, evaluation.count, losses)
            }[0]
            XCTAssertEqual(result.0, 21, label)
            XCTAssertTrue(result.2.allSatisfy(\.isFinite), "\(label): \(result.2)")
        }
    }

    func testCrossIterationBNCompensatesAgainstTheConvolutionThatFeedsIt() throws {
        let trainer = try Trainer(configuration: configuration(norm: .cbn, batch: 4, steps: 2), data: Self.data, world: SingleProcessCommunicator())
        let leaves = trainer.network.leaves
        for (index, leaf) in leaves.enumerated() {
            guard let cbn = leaf.layer as? CrossIterationBatchNorm<Float> else { continue }
            XCTAssertTrue(cbn.source === (leaves[index - 1].layer as AnyObject), "\(leaf.name) follows \(leaves[index - 1].name)")
        }
        XCTAssertEqual(leaves.filter { $0.layer is CrossIterationBatchNorm<Float> }.count, 21)
    }

    /// W ranks × b ≡ 1 rank × W·b with SyncBN and crop+flip on, uneven shards included
    /// (45 samples: global batch 12 leaves 9 = 3+2+2+2 on four ranks at the end of the epoch).
    func testResNetWithAugmentationIsWorldSizeInvariant() throws {
        for (ranks, batch) in [(2, 6), (4, 3)] {
            let steps = 5   // past the epoch's short last batch
            let single = try train(configuration(batch: ranks * batch, steps: steps), ranks: 1)
            let multi = try train(configuration(batch: batch, steps: steps), ranks: ranks)
            for (name, values) in single.state {
                XCTAssertLessThan(relativeError(multi.state[name]!, values), 1e-4, "\(ranks) ranks: \(name)")
            }
            assertClose(multi.losses, single.losses, relTol: 1e-4, "\(ranks) ranks: losses")
        }
    }

    /// A checkpoint written mid-epoch (step 5 of 7; 4 steps per epoch) and resumed continues bit
    /// for bit: schedule, sampler, augmentation, momentum and the BN statistics.
    func testMidEpochCheckpointResumesBitIdentically() throws {
        let path = temporaryDirectory() + "/resnet.safetensors"
        for norm in [NormalizationKind.syncbn, .cbn, .brn] {
            let c = configuration(norm: norm, batch: 6, steps: 7)
            let straight = try train(c, ranks: 2)
            _ = try train(c, ranks: 2, stopAt: 5, checkpoint: path)
            let resumed = try train(c, ranks: 2, resume: path)
            XCTAssertEqual(resumed.losses.count, 2)
            XCTAssertEqual(resumed.losses.map(\.bitPattern), Array(straight.losses.suffix(2)).map(\.bitPattern), "\(norm)")
            for (name, values) in straight.state {
                XCTAssertEqual(values.map(\.bitPattern), resumed.state[name]!.map(\.bitPattern), "\(norm): \(name)")
            }
            for (name, values) in straight.momentum {
                XCTAssertEqual(values.map(\.bitPattern), resumed.momentum[name]!.map(\.bitPattern), "\(norm): momentum of \(name)")
            }
        }
    }

    func testPeriodicCheckpointsAreWrittenDuringTheRun() throws {
        let path = temporaryDirectory() + "/periodic.safetensors"
        var c = configuration(batch: 6, steps: 6)
        c.evalStats = .ema
        let trainer = try Trainer(configuration: c, data: Self.data, world: SingleProcessCommunicator())
        trainer.checkpointing = (path, 4)
        _ = try trainer.run()
        let (_, written) = try Safetensors.read(path)
        XCTAssertEqual(written["step"], "4", "run() writes every 4 steps before the end; the end-of-run save is the caller's")
    }

    func testFoldingAResNetKeepsItsLogits() throws {
        var c = configuration(batch: 8, steps: 6)
        c.evalStats = .ema
        let trainer = try Trainer(configuration: c, data: Self.data, world: SingleProcessCommunicator())
        while trainer.step < trainer.totalSteps { try trainer.trainStep() }
        let folded = try trainer.network.foldingBatchNorm()
        XCTAssertTrue(folded.batchNormLayers.isEmpty)
        XCTAssertTrue(folded.state.contains { $0.name == "layer2.0.downsample.0.bias" })
        XCTAssertFalse(folded.state.contains { $0.name.contains("bn") })
        let (x, _) = Self.data.heldOut.batch(0..<16)
        let reference = try trainer.network.forward(x, mode: .inference), logits = try folded.forward(x, mode: .inference)
        XCTAssertLessThan(relativeError(logits.scalars, reference.scalars), 1e-5)
    }
}

extension TrainingConfiguration {
    /// Small PreciseBN budgets for tests on tiny data sets.
    mutating func precisBNForTests() {
        preciseBNSamples = 32
        preciseBNBatchSize = 8
    }
}

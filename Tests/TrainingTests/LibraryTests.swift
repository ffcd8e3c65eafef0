import Collectives
import Foundation
import Kernels
import Normalization
import TestSupport
import Training
import XCTest

/// The library pieces a user's own model is trained with: ``DataParallel``, the designated
/// ``Trainer`` initializer on a hand-built network, and the normalization protocol.
final class LibraryTests: XCTestCase {
    static let data = try! DataSource.split(.synthetic(train: 48, heldOut: 16, seed: 9), evaluation: nil, heldOutFraction: 0.1)

    /// A small network written from the library's layers, as a user would.
    static func customNetwork(group: (any Communicator)?, seed: UInt64 = 4) -> Network {
        var random = DeterministicRandom(seed: seed)
        let conv1 = Conv2d<Float>(inputChannels: 3, outputChannels: 6, kernelSize: 3, padding: 1, bias: false, random: &random)
        let conv2 = Conv2d<Float>(inputChannels: 6, outputChannels: 8, kernelSize: 3, stride: 2, padding: 1, bias: false, random: &random)
        func norm(_ channels: Int) -> BatchNorm<Float> {
            group.map { SyncBatchNorm<Float>(featureCount: channels, synchronizing: $0) } ?? BatchNorm<Float>(featureCount: channels)
        }
        return Network(layers: [
            ("stem", conv1), ("stem_bn", norm(6)), ("stem_relu", ReLU<Float>()),
            ("down", conv2), ("down_bn", norm(8)), ("down_relu", ReLU<Float>()),
            ("pool", GlobalAvgPool<Float>()),
            ("head", Linear<Float>(inputFeatures: 8, outputFeatures: 10, random: &random)),
        ])
    }

    static func options(steps: Int = 6) -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.batchSize = 4
        c.steps = steps
        c.learningRate = 0.05
        c.seed = 3
        c.preciseBNSamples = 32
        return c
    }

    func testDataParallelSumsEveryGradientBitForBitAsAnAllReducePerParameter() throws {
        // Per-rank BN (its buffers averaged) and small buckets: several all-reduces per step.
        let results = try InProcessGroup.run(size: 4) { comm -> Bool in
            let a = Self.customNetwork(group: nil), b = Self.customNetwork(group: nil)
            let (x, labels) = Self.data.train.batch(Array((comm.rank * 4)..<(comm.rank * 4 + 4)))
            let parallel = DataParallel(network: a, world: comm, bucketSize: 100)
            XCTAssertTrue(parallel.averagesBuffers, "per-rank BN buffers must be averaged")
            let (_, correctA, gradientA, _) = try softmaxCrossEntropy(logits: try a.forward(x, mode: .training), labels: labels, scale: 1 / 16)
            let totals = try parallel.backward(gradientA, summing: [Int64(correctA), Int64(comm.rank + 1)])
            // The reference: plain backward, then one all-reduce per parameter and per buffer.
            let (_, _, gradientB, _) = try softmaxCrossEntropy(logits: try b.forward(x, mode: .training), labels: labels, scale: 1 / 16)
            try b.backward(gradientB)
            for (_, p) in b.namedParameters { try comm.allReduceSum(&p.gradient.scalars) }
            for (_, buffer) in b.namedBuffers {
                var share = buffer.value.scalars.map { $0 * 0.25 }
                try comm.allReduceSum(&share)
                buffer.value.scalars = share
            }
            var correct = [Int64(correctA)]
            try comm.allReduceSum(&correct)
            XCTAssertEqual(totals, [correct[0], 10], "the carried integers, summed")
            for ((name, p), (_, q)) in zip(a.namedParameters, b.namedParameters) {
                XCTAssertEqual(p.gradient.scalars.map(\.bitPattern), q.gradient.scalars.map(\.bitPattern), name)
            }
            for ((name, p), (_, q)) in zip(a.namedBuffers, b.namedBuffers) {
                XCTAssertEqual(p.value.scalars.map(\.bitPattern), q.value.scalars.map(\.bitPattern), name)
            }
            return true
        }
        XCTAssertEqual(results, [true, true, true, true])
    }

    func testDataParallelStartsAllReducesBeforeBackwardEnds() throws {
        let starts = try InProcessGroup.run(size: 2) { base -> [Int] in
            let comm = InstrumentedCommunicator(base)
            let network = Self.customNetwork(group: nil)
            let parallel = DataParallel(network: network, world: comm, bucketSize: 64)
            // Started all-reduces as each top-level layer's backward begins (last layer first).
            var seen: [Int] = []
            network.trace = { pass, _ in
                if "\(pass)" == "backward" { seen.append(comm.ledger.collectiveCounts["startAllReduceSum"] ?? 0) }
            }
            let (x, labels) = Self.data.train.batch(Array((base.rank * 4)..<(base.rank * 4 + 4)))
            let (_, _, gradient, _) = try softmaxCrossEntropy(logits: try network.forward(x, mode: .training), labels: labels, scale: 1 / 8)
            try parallel.backward(gradient)
            return seen
        }[0]
        XCTAssertEqual(starts.count, 8)
        XCTAssertEqual(starts.first, 0)
        XCTAssertGreaterThan(starts.last!, 0, "no bucket had started before the first layer's backward: no overlap")
    }

    func testACustomNetworkTrainsSavesResumesBitIdenticallyAndEvaluatesWithPreciseBN() throws {
        let dir = temporaryDirectory()
        let path = dir + "/custom.safetensors"
        func run(resume: Bool = false, save: Bool = false, stopAt: Int? = nil) throws -> ([String: [Float]], [String: Double]) {
            try InProcessGroup.run(size: 2) { comm -> ([String: [Float]], [String: Double]) in
                let network = Self.customNetwork(group: comm)
                let trainer = try Trainer(network: network, optimizer: SGD(learningRate: 0.05, momentum: 0.9, weightDecay: 5e-4),
                                          data: Self.data, world: comm, options: Self.options())
                XCTAssertTrue(trainer.isCustomNetwork)
                if resume { try trainer.resume(from: path) }
                while trainer.step < (stopAt ?? trainer.totalSteps) { try trainer.trainStep() }
                if save { try trainer.save(to: path) }
                var evaluations: [String: Double] = [:]
                if stopAt == nil {
                    for (statistics, evaluation) in try trainer.evaluations(keepPrecise: true) { evaluations[statistics] = evaluation.accuracy }
                    try trainer.verifyReplicasAgree()
                }
                return (stateDictionary(trainer.network), evaluations)
            }[0]
        }
        let straight = try run()
        _ = try run(save: true, stopAt: 3)
        let resumed = try run(resume: true)
        XCTAssertEqual(straight.0.keys.sorted(), resumed.0.keys.sorted())
        for (name, values) in straight.0 {
            XCTAssertEqual(values.map(\.bitPattern), resumed.0[name]!.map(\.bitPattern), name)
        }
        XCTAssertEqual(Set(straight.1.keys), ["ema", "precise"])
        XCTAssertEqual(straight.1, resumed.1)
        // PreciseBN replaced the EMA statistics of the hand-built SyncBN layers.
        XCTAssertNotEqual(straight.0["stem_bn.running_var"], nil)
        let metadata = try Safetensors.read(path).metadata
        XCTAssertEqual(metadata["network"], "custom")
    }

    func testTheProtocolFindsEveryNormalizationOfTheBuiltInModels() throws {
        for norm in NormalizationKind.allCases where norm != .ibn {
            var c = Self.options()
            c.norm = norm
            let trainer = try Trainer(configuration: c, data: Self.data, world: SingleProcessCommunicator())
            // Weight-normalized models: the weight-normalized conv and its bias (or mean-only BN).
            let expected = norm.isWeightNormalized ? 6 : 3
            let found = trainer.network.normalizationLayers.count
            XCTAssertEqual(found, expected, "\(norm.rawValue): the convnet has \(expected) normalization layers, the protocol found \(found)")
        }
    }

    func testLibraryErrorsNameTheSettingsAndACommandLineNamesItsFlags() {
        var c = Self.options()
        c.batchSize = 0
        XCTAssertEqual(c.problem(), "batchSize must be between 1 and 1048576, got 0")
        c.batchSize = 4
        c.crossIteration.window = 99
        XCTAssertEqual(c.problem(), "crossIteration.window must be between 1 and 64, got 99")
        SettingNames.commandLine = RunAgreement.flagName
        defer { SettingNames.commandLine = nil }
        XCTAssertEqual(c.problem(), "--cbn-window must be between 1 and 64, got 99")
        XCTAssertEqual("\(LayerError("⟨norm⟩ ibn needs ⟨model⟩ resnet20"))", "--norm ibn needs --model resnet20")
    }
}

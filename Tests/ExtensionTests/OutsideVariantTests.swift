import Collectives
import Kernels
import Normalization
import TestSupport
import Training
import XCTest

/// A BN variant written outside the Normalization module, through its public extension points
/// only: batch statistics whose variance is floored (a guard some small-batch recipes use). It
/// must train under the trainer, and be found by PreciseBN and folding like the built-in layers.
final class FlooredVarianceBatchNorm: BatchNorm<Float> {
    let floor: Double
    /// How many training forwards the override handled (the hook is really called).
    var calls = 0

    init(featureCount: Int, floor: Double, group: (any Communicator)?) {
        self.floor = floor
        super.init(featureCount: featureCount, group: group)
    }

    override func trainingStatistics(_ input: Tensor<Float>, layout: ChannelLayout) throws -> TrainingNormalization? {
        guard var normalization = try super.trainingStatistics(input, layout: layout) else { return nil }
        calls += 1
        normalization.variance = normalization.variance.map { max($0, floor) }
        return normalization
    }
}

final class OutsideVariantTests: XCTestCase {
    func testAVariantDefinedOutsideTheModuleTrainsAndIsFoundByPreciseBNAndFolding() throws {
        let data = try DataSource.split(.synthetic(train: 48, heldOut: 16, seed: 9), evaluation: nil, heldOutFraction: 0.1)
        var options = TrainingConfiguration()
        options.batchSize = 4
        options.steps = 5
        options.learningRate = 0.05
        options.preciseBNSamples = 32
        let results = try InProcessGroup.run(size: 2) { comm -> (calls: Int, changed: Bool, foldedError: Double, foldedCount: Int) in
            var random = DeterministicRandom(seed: 1)
            let variant = FlooredVarianceBatchNorm(featureCount: 4, floor: 0.5, group: comm)
            let network = Network(layers: [
                ("conv", Conv2d<Float>(inputChannels: 3, outputChannels: 4, kernelSize: 3, padding: 1, bias: false, random: &random)),
                ("norm", variant), ("relu", ReLU<Float>()), ("pool", GlobalAvgPool<Float>()),
                ("head", Linear<Float>(inputFeatures: 4, outputFeatures: 10, random: &random)),
            ])
            let trainer = try Trainer(network: network, optimizer: SGD(learningRate: 0.05), data: data, world: comm, options: options)
            while trainer.step < trainer.totalSteps { try trainer.trainStep() }
            let ema = variant.runningVariance.value.scalars
            try trainer.recomputePopulationStatistics()
            let changed = variant.runningVariance.value.scalars != ema
            let folded = try network.foldingBatchNorm()
            let (x, _) = data.heldOut.batch(0..<8)
            let expected = try network.forward(x, mode: .inference), actual = try folded.forward(x, mode: .inference)
            return (variant.calls, changed, relativeError(actual.scalars, expected.scalars),
                    folded.leaves.filter { $0.layer is FlooredVarianceBatchNorm }.count)
        }
        for result in results {
            XCTAssertEqual(result.calls, 5, "the overridden hook ran in every training step")
            XCTAssertTrue(result.changed, "PreciseBN did not find the variant")
            XCTAssertEqual(result.foldedCount, 0, "folding left the variant in place")
            XCTAssertLessThan(result.foldedError, 1e-5)
        }
    }
}

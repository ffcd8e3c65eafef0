import Collectives
import Kernels
import Normalization
import TestSupport
import Training
import XCTest

final class FoldingTests: XCTestCase {
    func testFoldedNetworksHaveNoBatchNormAndTheSameHeldOutLogits() throws {
        let data = try DataSource.split(.synthetic(train: 96, heldOut: 64, seed: 8), evaluation: nil, heldOutFraction: 0.1)
        for (model, norm) in [(ModelKind.convnet, NormalizationKind.syncbn), (.mlp, .bn), (.convnet, .cbn), (.convnet, .mabn), (.mlp, .mabn)] {
            var c = TrainingConfiguration()
            c.model = model
            c.norm = norm
            c.batchSize = 8
            c.steps = 12
            (c.mabnWindow, c.mabnWarmup, c.mabnRenormHold) = (2, 3, 5)   // MABN: the windows and r in use
            let trainer = try Trainer(configuration: c, data: data, world: SingleProcessCommunicator())
            while trainer.step < trainer.totalSteps { try trainer.trainStep() }
            let folded = try trainer.network.foldingBatchNorm()
            let norms = trainer.network.normalizationLayers.count
            XCTAssertEqual(norms, model == .mlp ? 2 : 3, "\(model) \(norm)")
            XCTAssertTrue(folded.normalizationLayers.isEmpty, "\(model) \(norm): every normalization folded")
            XCTAssertEqual(folded.layers.count, trainer.network.layers.count - norms)
            let (x, _) = data.heldOut.batch(0..<64)
            let reference = try trainer.network.forward(x, mode: .inference), logits = try folded.forward(x, mode: .inference)
            let error = relativeError(logits.scalars, reference.scalars)
            XCTAssertLessThan(error, 1e-5, "\(model) \(norm): folded logits differ by \(error)")
            XCTAssertGreaterThan(reference.scalars.map(abs).max()!, 0.1, "logits are not trivially zero")
        }
    }

    func testABatchNormWithoutAPrecedingConvolutionCannotBeFolded() {
        let network = Network(layers: [("relu", ReLU<Float>()), ("bn", BatchNorm<Float>(featureCount: 2))])
        XCTAssertThrowsError(try network.foldingBatchNorm()) { XCTAssertTrue("\($0)".contains("cannot fold bn"), "\($0)") }
    }

    func testANegativeRunningVarianceCannotBeFolded() throws {
        var random = DeterministicRandom(seed: 1)
        let bn = BatchNorm<Float>(featureCount: 2)
        bn.runningVariance.value.scalars = [1, -0.5]
        let network = Network(layers: [("conv", Conv2d<Float>(inputChannels: 1, outputChannels: 2, kernelSize: 3, padding: 1, random: &random)),
                                       ("bn", bn)])
        XCTAssertThrowsError(try network.foldingBatchNorm()) {
            XCTAssertTrue("\($0)".contains("cannot fold bn") && "\($0)".contains("channel 1"), "\($0)")
        }
    }
}

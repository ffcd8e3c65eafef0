// A custom model written from syncbn's layers, trained data-parallel with `Trainer`:
// SyncBN statistics over all ranks, PreciseBN at the end, a checkpoint with every rank's state.
//
//     mpirun -n 2 .build/release/syncbn-example-custom-model [checkpoint.safetensors]
import Collectives
import CollectivesMPI
import Foundation
import Kernels
import Normalization
import Training

do {
    let world = try World.current()
    defer { World.finish() }
    var random = DeterministicRandom(seed: 1)
    func block(_ name: String, _ input: Int, _ output: Int, stride: Int) -> [(name: String, layer: any Layer<Float>)] {
        [(name + ".conv", Conv2d<Float>(inputChannels: input, outputChannels: output, kernelSize: 3, stride: stride, padding: 1,
                                        bias: false, random: &random)),
         (name + ".bn", SyncBatchNorm<Float>(featureCount: output, synchronizing: world)),
         (name + ".relu", ReLU<Float>())]
    }
    let data = try DataSource.split(.synthetic(train: 2048, heldOut: 512, seed: 0), evaluation: nil, heldOutFraction: 0.1)
    let network = Network(layers: block("stem", data.train.sampleShape[0], 8, stride: 1) + block("down", 8, 16, stride: 2) + [
        ("pool", GlobalAvgPool<Float>()),
        ("head", Linear<Float>(inputFeatures: 16, outputFeatures: data.train.classes, random: &random)),
    ])

    var options = TrainingConfiguration()   // everything but the model: batch, schedule, PreciseBN, …
    options.batchSize = 16
    options.steps = 200
    options.learningRate = 0.2
    let trainer = try Trainer(network: network, optimizer: SGD(learningRate: 0.2, momentum: 0.9, weightDecay: 5e-4),
                              data: data, world: world, options: options)
    let summary = try trainer.run()
    if CommandLine.arguments.count > 1 { try trainer.save(to: CommandLine.arguments[1]) }
    if world.rank == 0 {
        for (statistics, evaluation) in summary.evaluations.sorted(by: { $0.key < $1.key }) {
            print(String(format: "%@: held-out accuracy %.2f%% after %d steps on %d ranks", statistics, evaluation.accuracy * 100,
                         summary.steps, world.size))
        }
    }
} catch {
    FileHandle.standardError.write(Data("syncbn-example-custom-model: error: \(error)\n".utf8))
    exit(2)
}

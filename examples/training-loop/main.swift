// A hand-written training loop: the gradient exchange of `DataParallel` (buckets all-reduced during
// backward), SGD, and PreciseBN for the population statistics, over whatever ranks mpirun started.
//
//     mpirun -n 2 .build/release/syncbn-example-training-loop
import Collectives
import CollectivesMPI
import Foundation
import Kernels
import Normalization
import Training

do {
    let world = try World.current()
    defer { World.finish() }
    let data = try DataSource.split(.synthetic(train: 2048, heldOut: 512, seed: 0), evaluation: nil, heldOutFraction: 0.1)
    var random = DeterministicRandom(seed: 2)
    let conv = Conv2d<Float>(inputChannels: data.train.sampleShape[0], outputChannels: 8, kernelSize: 3, padding: 1, bias: false, random: &random)
    let network = Network(layers: [
        ("conv", conv), ("bn", SyncBatchNorm<Float>(featureCount: 8, synchronizing: world)), ("relu", ReLU<Float>()),
        ("pool", GlobalAvgPool<Float>()), ("fc", Linear<Float>(inputFeatures: 8, outputFeatures: data.train.classes, random: &random)),
    ])
    let parallel = DataParallel(network: network, world: world)
    let optimizer = SGD(learningRate: 0.1, momentum: 0.9, weightDecay: 5e-4)
    let parameters = network.namedParameters
    let perRank = 16, globalBatch = perRank * world.size
    for step in 0..<200 {
        // This rank's piece of the step's global batch (here simply consecutive samples).
        let first = (step * globalBatch + world.rank * perRank) % (data.train.count - perRank)
        let (x, labels) = data.train.batch(Array(first..<(first + perRank)))
        network.sampleOffset = world.rank * perRank   // where this rank's samples sit in the global batch
        let logits = try network.forward(x, mode: .training)
        let (_, correct, gradient, loss) = try softmaxCrossEntropy(logits: logits, labels: labels, scale: 1 / Float(globalBatch))
        // Backward with the exchange; the loss (fixed point) and correct count ride along.
        let totals = try parallel.backward(gradient, summing: [loss.units, Int64(correct)])
        optimizer.step(parameters)
        if world.rank == 0 && (step + 1) % 50 == 0 {
            var total = FixedPointLoss()
            total.units = totals[0]
            print(String(format: "step %d: loss %.4f, accuracy %.1f%%", step + 1, total.value / Double(globalBatch),
                         Double(totals[1]) / Double(globalBatch) * 100))
        }
    }
    // PreciseBN: population statistics over 1024 training samples on all ranks, then evaluation.
    try PreciseBN.recompute(network: network, data: data.train, sampleBudget: 1024, batchSize: 64, seed: 0, world: world)
    let piece = contiguousPiece(of: data.heldOut.count, parts: world.size, index: world.rank)
    let (x, labels) = data.heldOut.batch(piece)
    network.sampleOffset = piece.lowerBound
    let (_, correct, _, _) = try softmaxCrossEntropy(logits: try network.forward(x, mode: .inference), labels: labels, scale: 0)
    var counts = [Int64(correct), Int64(piece.count)]
    try world.allReduceSum(&counts)
    if world.rank == 0 {
        print(String(format: "held-out accuracy %.2f%% with PreciseBN statistics, on %d ranks", Double(counts[0]) / Double(counts[1]) * 100, world.size))
    }
} catch {
    FileHandle.standardError.write(Data("syncbn-example-training-loop: error: \(error)\n".utf8))
    exit(2)
}

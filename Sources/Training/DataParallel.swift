import Collectives
import Kernels
import Normalization

/// Data parallelism for one `Network` replica per rank: the gradient exchange (PyTorch's
/// `DistributedDataParallel`), which ``Trainer`` uses too.
///
/// ``backward(_:summing:)`` back-propagates and, as soon as backward has finished enough layers
/// to fill a bucket of `bucketSize` gradient values, starts that bucket's all-reduce(SUM) without
/// blocking, so it overlaps the rest of backward. Afterwards every parameter's gradient is the sum
/// over the ranks of each rank's gradient — scale the loss by 1/(global batch) for the gradient of
/// the global mean loss. The last bucket also carries:
/// - when some normalization layer keeps statistics for fewer ranks than the job (per-rank BN,
///   sync groups smaller than the job), every floating-point buffer divided by the number of
///   ranks, so the running statistics stay the rank average and the replicas identical;
/// - the caller's non-negative integers (a loss in fixed point, a correct count), summed exactly
///   whatever the order of addition; still one collective per bucket.
///
/// Every rank forms the same buckets in the same order (the layers' order). After the exchange,
/// the gradients that are functions of the summed ones are finished (weight normalization's,
/// ``ExchangedGradients``) and the contributions every rank computed alike from group-wide
/// statistics (cross-iteration BN's compensated gradient) are added once.
public final class DataParallel {
    public let network: Network
    public let world: any Communicator
    /// Gradient values per all-reduce bucket (at least; a layer's parameters are not split).
    public var bucketSize: Int
    /// Whether the buffers are averaged over the ranks with every exchange.
    public let averagesBuffers: Bool

    private let parameters: [Parameter<Float>]
    private let buffers: [Buffer<Float>]
    private let deferring: [ExchangedGradients]

    /// - Parameter averageBuffers: nil (the default) decides from the layers: true when the job
    ///   has more than one rank and a normalization layer with buffers shares its statistics with
    ///   fewer ranks than the job.
    public init(network: Network, world: any Communicator, bucketSize: Int = 1 << 16, averageBuffers: Bool? = nil) {
        self.network = network
        self.world = world
        self.bucketSize = max(bucketSize, 1)
        let leaves = network.leaves
        let perRank = leaves.contains { entry in
            guard let norm = entry.layer as? NormalizationLayer else { return false }
            let hasBuffers = entry.layer.state.contains { if case .buffer = $0 { return true } else { return false } }
            return hasBuffers && (norm.statisticsGroup?.size ?? 1) < world.size
        }
        averagesBuffers = averageBuffers ?? (world.size > 1 && perRank)
        parameters = network.namedParameters.map(\.parameter)
        buffers = network.namedBuffers.map(\.buffer)
        deferring = leaves.compactMap { $0.layer as? ExchangedGradients }
        for layer in deferring { layer.defersGradients = true }
    }

    /// Back-propagates the gradient of the loss with respect to the network's output and sums
    /// the parameter gradients over the ranks (see the type's description); returns `integers`
    /// summed over the ranks.
    @discardableResult
    public func backward(_ outputGradient: Tensor<Float>, summing integers: [Int64] = []) throws -> [Int64] {
        var pending: [Parameter<Float>] = []
        var pendingCount = 0
        var inFlight: [(request: AllReduceRequest<Float>, parameters: [Parameter<Float>])] = []
        func startBucket(extra: [Float] = []) throws {
            var flat: [Float] = []
            flat.reserveCapacity(pendingCount + extra.count)
            for p in pending { flat.append(contentsOf: p.gradient.scalars) }
            flat.append(contentsOf: extra)
            inFlight.append((try world.startAllReduceSum(flat), pending))
            pending = []
            pendingCount = 0
        }
        try network.backward(outputGradient) { layer in
            for p in layer.parameters.reversed() {
                pending.append(p)
                pendingCount += p.gradient.count
            }
            if pendingCount >= bucketSize { try startBucket() }
        }
        let buffers = averagesBuffers ? self.buffers : []
        let share = 1 / Float(world.size)
        var extra: [Float] = []
        for b in buffers { extra.append(contentsOf: b.value.scalars.map { $0 * share }) }
        precondition(integers.allSatisfy { $0 >= 0 }, "DataParallel carries non-negative integers")
        let integersRide = world.size <= IntegerPieces.maximumRanks
        if integersRide { extra += integers.flatMap(IntegerPieces.encode) }
        try startBucket(extra: extra)
        let integersRequest = integersRide || integers.isEmpty ? nil : try world.startAllReduceSum(integers)

        var flat: [Float] = []
        for (request, parameters) in inFlight {
            flat = try request.wait()
            var offset = 0
            for p in parameters {
                p.gradient.scalars.replaceSubrange(0..<p.gradient.count, with: flat[offset..<(offset + p.gradient.count)])
                offset += p.gradient.count
            }
            flat.removeFirst(offset)
        }
        var offset = 0
        for b in buffers {
            b.value.scalars.replaceSubrange(0..<b.value.count, with: flat[offset..<(offset + b.value.count)])
            offset += b.value.count
        }
        for layer in deferring { layer.finishExchangedGradients() }
        for p in parameters { p.applyPendingGradient() }
        if let integersRequest { return try integersRequest.wait() }
        guard integersRide else { return [] }
        return (0..<integers.count).map {
            IntegerPieces.decode(flat[(offset + $0 * IntegerPieces.count)..<(offset + ($0 + 1) * IntegerPieces.count)])
        }
    }
}

/// Non-negative integers carried exactly by a Float all-reduce: 12 bits per Float, so each
/// piece's sum over up to 4,096 ranks stays below 2²⁴, where every Float sum of integers is exact
/// in any order.
enum IntegerPieces {
    static let count = 6
    static let maximumRanks = 4096

    static func encode(_ value: Int64) -> [Float] {
        precondition(value >= 0, "IntegerPieces carries non-negative integers")
        return (0..<count).map { Float((value >> (12 * $0)) & 0xFFF) }
    }

    static func decode(_ pieces: ArraySlice<Float>) -> Int64 {
        pieces.enumerated().reduce(Int64(0)) { $0 &+ (Int64($1.element) << (12 * $1.offset)) }
    }
}

import Collectives
import Kernels

/// Domain-specific batch normalization ("Rethinking 'Batch' in BatchNorm" §5, "batch from
/// different domains"; Chang et al. 2019): when a batch mixes samples of several domains, each
/// domain's samples are normalized with that domain's own batch statistics (synchronized over the
/// group: the statistics of all domains travel in one all-reduce), and each domain keeps its own
/// running statistics for inference, which uses the sample's own domain. γ and β are shared.
///
/// The trainer sets ``domains`` (one label per sample of the next forward) before every forward.
/// Backward is BN's per domain (one all-reduce of every domain's Σdy and Σdy·x̂). State: `weight`,
/// `bias`, and per domain d `domains.d.running_mean`, `domains.d.running_var`,
/// `domains.d.num_batches_tracked`.
public final class DomainBatchNorm<Scalar: BatchNormScalar>: Layer {
    public let featureCount: Int
    public let domainCount: Int
    public let epsilon: Double
    public let momentum: Double?
    public let group: (any Communicator)?
    public let weight: Parameter<Scalar>
    public let bias: Parameter<Scalar>
    public let runningMeans: [Buffer<Scalar>]
    public let runningVariances: [Buffer<Scalar>]
    public let batchesTracked: [Counter]
    /// The domain (0 ..< domainCount) of each sample of the next forward.
    public var domains: [Int32] = []
    /// Per domain, the statistics of the last training or `.batchStatistics` batch over the group
    /// (nil where the domain had no samples).
    public private(set) var lastStatistics: [BatchStatistics?] = []

    private var lastInput = Tensor<Scalar>(shape: [0])
    private var lastLayout = ChannelLayout(batch: 0, channels: 0, spatial: 0)
    private var lastDomains: [Int] = []
    private var lastMean: [[Double]] = []
    private var lastInvStd: [[Double]] = []

    public init(featureCount: Int, domainCount: Int, epsilon: Double = 1e-5, momentum: Double? = 0.1, group: (any Communicator)? = nil) {
        precondition(featureCount > 0 && domainCount >= 1, "DomainBatchNorm: features and domains ≥ 1")
        self.featureCount = featureCount
        self.domainCount = domainCount
        self.epsilon = epsilon
        self.momentum = momentum
        self.group = group
        weight = Parameter(Tensor(shape: [featureCount], repeating: 1))
        bias = Parameter(Tensor(shape: [featureCount]))
        runningMeans = (0..<domainCount).map { _ in Buffer(Tensor(shape: [featureCount])) }
        runningVariances = (0..<domainCount).map { _ in Buffer(Tensor(shape: [featureCount], repeating: 1)) }
        batchesTracked = (0..<domainCount).map { _ in Counter() }
    }

    public var state: [StateEntry<Scalar>] {
        [.parameter("weight", weight), .parameter("bias", bias)] + (0..<domainCount).flatMap { d -> [StateEntry<Scalar>] in
            [.buffer("domains.\(d).running_mean", runningMeans[d]), .buffer("domains.\(d).running_var", runningVariances[d]),
             .counter("domains.\(d).num_batches_tracked", batchesTracked[d])]
        }
    }

    func checkedDomains(_ layout: ChannelLayout) throws -> [Int] {
        guard domains.count == layout.batch else {
            throw LayerError("DomainBatchNorm: \(layout.batch) samples but \(domains.count) domain labels")
        }
        return try domains.map {
            guard (0..<Int32(domainCount)).contains($0) else { throw LayerError("DomainBatchNorm: domain \($0) outside 0..<\(domainCount)") }
            return Int($0)
        }
    }

    /// Per sample and channel y = a·x + b, from per-domain mean and 1/σ.
    func apply(_ input: Tensor<Scalar>, layout: ChannelLayout, domains: [Int], mean: [[Double]], invStd: [[Double]]) -> Tensor<Scalar> {
        let gamma = Scalar.widened(weight.value.scalars), beta = Scalar.widened(bias.value.scalars)
        var scale = [Double](repeating: 0, count: layout.batch * featureCount), offset = scale
        for n in 0..<layout.batch {
            let d = domains[n]
            for c in 0..<featureCount {
                scale[n * featureCount + c] = gamma[c] * invStd[d][c]
                offset[n * featureCount + c] = beta[c] - mean[d][c] * scale[n * featureCount + c]
            }
        }
        return .affine(input, layout: ChannelLayout(batch: 1, channels: layout.batch * featureCount, spatial: layout.spatial),
                       scale: scale, offset: offset)
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let layout = ChannelLayout(shape: input.shape), layout.channels == featureCount else {
            throw LayerError("DomainBatchNorm: expected N×\(featureCount) or N×\(featureCount)×H×W input, got \(input.shape)")
        }
        let sampleDomains = try checkedDomains(layout)
        let C = featureCount, P = layout.spatial, D = domainCount, width = 1 + 2 * C
        if mode == .inference {
            let mean = runningMeans.map { Scalar.widened($0.value.scalars) }
            let invStd = runningVariances.map { Scalar.widened($0.value.scalars).map { 1 / ($0 + epsilon).squareRoot() } }
            return apply(input, layout: layout, domains: sampleDomains, mean: mean, invStd: invStd)
        }
        // Count, Σ(x − K), Σ(x − K)² per domain and channel (K: the domain's running mean), one all-reduce.
        let shifts = runningMeans.map { Scalar.widened($0.value.scalars) }
        // One leaf per sample (its domain's slots filled, the others 0), added along the pairwise
        // tree over the batch, so the sums do not depend on how the batch is split.
        let N = layout.batch
        var leaves = [Double](repeating: 0, count: max(N, 1) * D * width)
        // Each plane summed around its own first value (the specialised kernel), then moved
        // exactly to its domain's shift K: Σ(x − K) = s1 + P·δ, Σ(x − K)² = s2 + 2δ·s1 + P·δ².
        var planeSums = [Double](repeating: 0, count: N * 2 * C)
        input.scalars.withUnsafeBufferPointer { x in
            planeSums.withUnsafeMutableBufferPointer { Scalar.planeShiftedSums(x, layout: layout, into: $0.baseAddress!) }
        }
        for n in 0..<N {
            let d = sampleDomains[n], leaf = n * D * width + d * width
            leaves[leaf] = Double(P)
            for c in 0..<C {
                let delta = P > 0 ? Double(input.scalars[(n * C + c) * P]) - shifts[d][c] : 0
                let s1 = planeSums[n * 2 * C + c], s2 = planeSums[n * 2 * C + C + c]
                leaves[leaf + 1 + c] = s1 + Double(P) * delta
                leaves[leaf + 1 + C + c] = s2 + 2 * delta * s1 + Double(P) * delta * delta
            }
        }
        leaves.withUnsafeMutableBufferPointer { Double.pairwiseSumInPlace($0.baseAddress!, count: N, width: D * width, stride: D * width) }
        var packed = Array(leaves[0..<(D * width)])
        if let group { try group.allReduceSum(&packed) }
        var mean = shifts, invStd = shifts
        lastStatistics = (0..<D).map { d in
            let m = packed[d * width]
            guard m > 0 else { return nil }
            let shifted = (0..<C).map { packed[d * width + 1 + $0] / m }
            let variance = (0..<C).map { max(packed[d * width + 1 + C + $0] / m - shifted[$0] * shifted[$0], 0) }
            return BatchStatistics(count: m, mean: (0..<C).map { shifts[d][$0] + shifted[$0] }, variance: variance)
        }
        for d in 0..<D {
            // Every domain's counter counts training forwards, present or not, so that ranks with
            // per-rank statistics keep identical counters whatever domains their batches hold.
            if mode == .training { batchesTracked[d].value += 1 }
            guard let statistics = lastStatistics[d] else { continue }
            if statistics.count <= 1 {
                throw LayerError("DomainBatchNorm: domain \(d) has 1 value per channel in this batch; use a larger batch or sync over more ranks")
            }
            mean[d] = statistics.mean
            invStd[d] = statistics.variance.map { 1 / ($0 + epsilon).squareRoot() }
            if mode == .training {
                let factor = momentum ?? 1 / Double(batchesTracked[d].value), correction = statistics.count / (statistics.count - 1)
                for c in 0..<C {
                    runningMeans[d].value.scalars[c] = Scalar((1 - factor) * Double(runningMeans[d].value.scalars[c]) + factor * statistics.mean[c])
                    runningVariances[d].value.scalars[c] = Scalar((1 - factor) * Double(runningVariances[d].value.scalars[c])
                                                                  + factor * statistics.variance[c] * correction)
                }
            }
        }
        if mode == .training {
            lastInput = input
            lastLayout = layout
            lastDomains = sampleDomains
            lastMean = mean
            lastInvStd = invStd
        }
        return apply(input, layout: layout, domains: sampleDomains, mean: mean, invStd: invStd)
    }

    /// Per domain d: dx = γ/σ_d·(dy − Σ_d dy/M_d − x̂·Σ_d dy·x̂/M_d); dγ = Σ dy·x̂, dβ = Σ dy (local).
    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let layout = lastLayout, C = featureCount, P = layout.spatial, D = domainCount
        guard outputGradient.count == lastInput.count else {
            throw LayerError("DomainBatchNorm: gradient \(outputGradient.shape) does not match the forward input \(lastInput.shape)")
        }
        // Per sample: its domain's [Σdy, Σdy·x̂] (other domains 0) for the group's sums, and
        // [dβ, dγ] for the parameters; both added over samples along the pairwise tree.
        let N = layout.batch
        var leaves = [Double](repeating: 0, count: max(N, 1) * D * 2 * C)
        var parameterLeaves = [Double](repeating: 0, count: N * 2 * C)
        // Per plane Σdy and Σdy·(x − μ_d) through the specialised kernel (one "channel" per plane).
        let planes = ChannelLayout(batch: 1, channels: N * C, spatial: P)
        let planeMeans = (0..<(N * C)).map { lastMean[lastDomains[$0 / C]][$0 % C] }
        var planeSums = [Double](repeating: 0, count: 2 * N * C)
        outputGradient.scalars.withUnsafeBufferPointer { dy in
            lastInput.scalars.withUnsafeBufferPointer { x in
                planeMeans.withUnsafeBufferPointer { mu in
                    planeSums.withUnsafeMutableBufferPointer { Scalar.planeGradientSums(dy, x, layout: planes, mean: mu, into: $0.baseAddress!) }
                }
            }
        }
        for n in 0..<N {
            let d = lastDomains[n]
            for c in 0..<C {
                let sumDy = planeSums[n * C + c], sumDyX = planeSums[N * C + n * C + c] * lastInvStd[d][c]
                leaves[n * D * 2 * C + d * 2 * C + c] = sumDy
                leaves[n * D * 2 * C + d * 2 * C + C + c] = sumDyX
                parameterLeaves[n * 2 * C + c] = sumDy
                parameterLeaves[n * 2 * C + C + c] = sumDyX
            }
        }
        leaves.withUnsafeMutableBufferPointer { Double.pairwiseSumInPlace($0.baseAddress!, count: N, width: D * 2 * C, stride: D * 2 * C) }
        let local = Array(leaves[0..<(D * 2 * C)])
        parameterLeaves.withUnsafeBufferPointer { l in
            bias.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress!, count: N, width: C, stride: 2 * C))
            weight.gradient = Tensor(shape: [C], scalars: Scalar.pairwiseSum(ofRounded: l.baseAddress! + C, count: N, width: C, stride: 2 * C))
        }
        var global = local
        if let group { try group.allReduceSum(&global) }
        let gamma = Scalar.widened(weight.value.scalars)
        // dx = p0·(dy − mean dy − x̂·mean dy·x̂) = p·dy + q·x + r per plane, p = γ/σ_d.
        var p = [Double](repeating: 0, count: N * C), q = p, r = p
        for n in 0..<N {
            let d = lastDomains[n]
            guard let m = lastStatistics[d]?.count else { continue }
            for c in 0..<C {
                let s = lastInvStd[d][c], mu = lastMean[d][c], p0 = gamma[c] * s, i = n * C + c
                let meanDy = global[d * 2 * C + c] / m, meanDyX = global[d * 2 * C + C + c] / m
                p[i] = p0
                q[i] = -p0 * s * meanDyX
                r[i] = -p0 * meanDy - q[i] * mu
            }
        }
        return .combining(outputGradient, lastInput, layout: planes, dyScale: p, xScale: q, offset: r)
    }

    /// Sets the running statistics of domain `d` (PreciseBN).
    public func setPopulation(domain d: Int, mean: [Double], variance: [Double]) {
        runningMeans[d].value.scalars = mean.map { Scalar($0) }
        runningVariances[d].value.scalars = variance.map { Scalar($0) }
    }

    /// Gives every domain the running statistics of domain `source` (one shared set, as a model
    /// trained without domain-specific statistics has).
    public func shareStatistics(of source: Int) {
        for d in 0..<domainCount where d != source {
            runningMeans[d].value.scalars = runningMeans[source].value.scalars
            runningVariances[d].value.scalars = runningVariances[source].value.scalars
        }
    }
}

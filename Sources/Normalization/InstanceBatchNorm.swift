import Kernels

/// IBN-Net's "IBN" layer (Pan et al. 2018, "Two at Once", the IBN-a block): the first
/// ⌊C·ratio⌋ channels are normalized by InstanceNorm (affine, per sample), the rest by a batch
/// normalization (BN or SyncBN), and the two halves are put back side by side. State under
/// IBN-Net's names: `IN.weight`, `IN.bias`, `BN.weight`, `BN.bias`, `BN.running_mean`, ….
public final class InstanceBatchNorm<Scalar: BatchNormScalar>: LayerContainer {
    public let featureCount: Int
    /// Channels given to InstanceNorm (the first ones).
    public let instanceChannels: Int
    public let instanceNorm: GroupNorm<Scalar>
    public let batchNorm: BatchNorm<Scalar>

    public init(featureCount: Int, ratio: Double = 0.5, batchNorm make: (Int) -> BatchNorm<Scalar>, epsilon: Double = 1e-5) {
        let half = Int(Double(featureCount) * ratio)
        precondition(half >= 1 && half < featureCount, "IBN needs at least one channel on each side, got \(featureCount) channels")
        self.featureCount = featureCount
        instanceChannels = half
        instanceNorm = GroupNorm<Scalar>(featureCount: half, groups: half, epsilon: epsilon)
        batchNorm = make(featureCount - half)
    }

    public var children: [(name: String, layer: any Layer<Scalar>)] { [("IN", instanceNorm), ("BN", batchNorm)] }

    public var state: [StateEntry<Scalar>] {
        children.flatMap { child in child.layer.state.map { $0.prefixed(child.name) } }
    }

    /// Channels [range] of an N×C×H×W tensor.
    public func channels(_ x: Tensor<Scalar>, _ range: Range<Int>) -> Tensor<Scalar> {
        let n = x.shape[0], plane = x.shape.dropFirst(2).reduce(1, *)
        var out = [Scalar](repeating: 0, count: n * range.count * plane)
        for i in 0..<n {
            let from = (i * featureCount + range.lowerBound) * plane, to = i * range.count * plane
            out[to..<(to + range.count * plane)] = x.scalars[from..<(from + range.count * plane)]
        }
        return Tensor(shape: [n, range.count] + x.shape.dropFirst(2), scalars: out)
    }

    /// The two halves side by side again.
    public func joined(_ a: Tensor<Scalar>, _ b: Tensor<Scalar>) -> Tensor<Scalar> {
        let n = a.shape[0], plane = a.shape.dropFirst(2).reduce(1, *)
        let ca = a.shape[1], cb = b.shape[1]
        var out = [Scalar](repeating: 0, count: n * (ca + cb) * plane)
        for i in 0..<n {
            let base = i * (ca + cb) * plane
            out[base..<(base + ca * plane)] = a.scalars[(i * ca * plane)..<((i + 1) * ca * plane)]
            out[(base + ca * plane)..<(base + (ca + cb) * plane)] = b.scalars[(i * cb * plane)..<((i + 1) * cb * plane)]
        }
        return Tensor(shape: [n, ca + cb] + a.shape.dropFirst(2), scalars: out)
    }

    public func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard input.shape.count == 4, input.shape[1] == featureCount else {
            throw LayerError("IBN: expected N×\(featureCount)×H×W input, got \(input.shape)")
        }
        let a = try instanceNorm.forward(channels(input, 0..<instanceChannels), mode: mode)
        let b = try batchNorm.forward(channels(input, instanceChannels..<featureCount), mode: mode)
        return joined(a, b)
    }

    public func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let a = try instanceNorm.backward(channels(outputGradient, 0..<instanceChannels))
        let b = try batchNorm.backward(channels(outputGradient, instanceChannels..<featureCount))
        return joined(a, b)
    }
}

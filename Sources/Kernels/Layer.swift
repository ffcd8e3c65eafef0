/// How a layer runs a forward pass.
public enum Mode: Sendable {
    /// Batch statistics, state updates (running statistics) and everything backward needs.
    case training
    /// Population (running) statistics; nothing is recorded and no collective is issued.
    case inference
    /// Batch statistics (synchronized as in training) with the model frozen: no state update,
    /// nothing kept for backward. The mode of a PreciseBN pass.
    case batchStatistics
}

/// A trainable tensor and the gradient of the loss with respect to it.
public final class Parameter<Scalar: TensorScalar> {
    public var value: Tensor<Scalar>
    /// Written (not accumulated) by the owning layer's `backward`.
    public var gradient: Tensor<Scalar>
    /// A contribution from another layer (cross-iteration BN's compensation term, which depends
    /// on this weight). When it comes from statistics shared by all ranks it is identical on every
    /// rank and is added to the summed gradient by ``applyPendingGradient()`` after the gradient
    /// exchange; when it is this rank's own (`pendingGradientIsLocal`, per-rank statistics), the
    /// owning layer's next backward adds it to the local gradient, for the exchange to sum. It is
    /// kept at the parameter's precision (its author sums it in Double and rounds it once).
    public var pendingGradient: [Scalar]?
    public var pendingGradientIsLocal = false

    public init(_ value: Tensor<Scalar>) {
        self.value = value
        self.gradient = Tensor(shape: value.shape)
    }
}

extension Parameter {
    /// Adds ``pendingGradient`` (if any) to `gradient` and clears it. A pending gradient is the
    /// same on every rank (it is computed from statistics over the whole group), so it is added
    /// once, after the gradients of the ranks have been summed (the trainer does this; a single
    /// process calls it right after backward).
    public func applyPendingGradient() {
        guard let pending = pendingGradient, !pendingGradientIsLocal else { return }
        Self.add(pending, to: &gradient)
        pendingGradient = nil
    }

    /// gradient[i] += pending[i], with the type's vector loop (per element through `scalars` the
    /// access checks dominated).
    private static func add(_ pending: [Scalar], to gradient: inout Tensor<Scalar>) {
        precondition(pending.count == gradient.count, "a pending gradient of \(pending.count) values for a parameter of \(gradient.count)")
        pending.withUnsafeBufferPointer { n in
            gradient.scalars.withUnsafeMutableBufferPointer { Scalar.add(n, into: $0) }
        }
    }

    /// Adds a rank-local ``pendingGradient`` to `gradient` (the owning layer's backward calls this).
    public func addLocalPendingGradient(to gradient: inout Tensor<Scalar>) {
        guard let pending = pendingGradient, pendingGradientIsLocal else { return }
        Self.add(pending, to: &gradient)
        pendingGradient = nil
    }
}

/// Non-trainable floating-point state, such as BatchNorm's running mean and variance.
public final class Buffer<Scalar: TensorScalar> {
    public var value: Tensor<Scalar>
    public init(_ value: Tensor<Scalar>) { self.value = value }
}

/// Non-trainable integer state, such as BatchNorm's `num_batches_tracked`.
public final class Counter {
    public var value: Int64
    public init(_ value: Int64 = 0) { self.value = value }
}

/// State that differs between ranks by design (cross-iteration BN's window of local sums):
/// a flat Double vector whose layout its owner defines. Checkpoints keep one copy per rank.
/// An owner that keeps the state in a form of its own (cross-iteration BN: its derivatives at the
/// model's precision) overrides `values` to write and read that vector.
open class RankLocalState {
    open var values: [Double]
    /// Checks stored values before they are restored: nil when they fit, else what is wrong.
    public let validate: ([Double]) -> String?
    /// The values that stand for "no history" (what `--reset-cbn-windows` restores), given
    /// the values of another rank.
    public let emptied: ([Double]) -> [Double]

    public init(_ values: [Double] = [], validate: @escaping ([Double]) -> String? = { _ in nil },
                emptied: @escaping ([Double]) -> [Double] = { _ in [] }) {
        self.values = values
        self.validate = validate
        self.emptied = emptied
    }
}

/// One named piece of a layer's state, as it appears in checkpoints.
public enum StateEntry<Scalar: TensorScalar> {
    case parameter(String, Parameter<Scalar>)
    case buffer(String, Buffer<Scalar>)
    case counter(String, Counter)
    case rankLocal(String, RankLocalState)

    public var name: String {
        switch self {
        case let .parameter(name, _), let .buffer(name, _), let .counter(name, _), let .rankLocal(name, _): return name
        }
    }

    /// The same entry with `prefix.` in front of its name.
    public func prefixed(_ prefix: String) -> StateEntry {
        switch self {
        case let .parameter(name, p): return .parameter(prefix + "." + name, p)
        case let .buffer(name, b): return .buffer(prefix + "." + name, b)
        case let .counter(name, c): return .counter(prefix + "." + name, c)
        case let .rankLocal(name, r): return .rankLocal(prefix + "." + name, r)
        }
    }
}

/// A differentiable layer: `forward` maps a batch, `backward` maps the gradient of the loss with
/// respect to the last forward's output to the gradient with respect to its input, writing the
/// gradients of the layer's parameters on the way.
///
/// `backward` refers to the most recent `forward` in training mode; a layer keeps what it needs
/// for that (and only that) between the two calls.
public protocol Layer<Scalar>: AnyObject {
    associatedtype Scalar: TensorScalar
    func forward(_ input: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar>
    func backward(_ outputGradient: Tensor<Scalar>) throws -> Tensor<Scalar>
    /// Parameters, buffers and counters under names relative to the layer (`weight`, `running_mean`).
    var state: [StateEntry<Scalar>] { get }
}

extension Layer {
    public var state: [StateEntry<Scalar>] { [] }

    /// The layer's parameters, in `state` order.
    public var parameters: [Parameter<Scalar>] {
        state.compactMap { if case let .parameter(_, p) = $0 { return p } else { return nil } }
    }
}

func requireShape(_ ok: Bool, _ layer: String, _ message: @autoclosure () -> String) throws {
    if !ok { throw LayerError("\(layer): \(message())") }
}

/// A layer whose batch computations run on fixed chunks of samples aligned to the global sample
/// index (the exactness contract): before each forward, the caller says where the batch starts in
/// the global batch (a rank's first sample), so that a sample sits at the same place in the same
/// chunk on any rank. 0 (the default) for a batch that is the whole global batch.
public protocol SampleAligned: AnyObject {
    var sampleOffset: Int { get set }
}

/// A layer whose parameter gradients are a function of another gradient that the ranks must
/// sum first (weight normalization's dL/dg, dL/dv from dL/dw): with `defersGradients` set,
/// backward leaves that gradient in the parameters' gradient slots for the exchange, and
/// `finishExchangedGradients()` computes the real ones from the sum.
public protocol ExchangedGradients: AnyObject {
    var defersGradients: Bool { get set }
    func finishExchangedGradients()
}

/// A layer that computes a wrapped layer with a weight derived from its own parameters (weight
/// normalization's g·v/‖v‖, weight centralization's v − mean(v)): `materializedLayer()` sets
/// that weight in the wrapped layer and returns it, for folding and export.
public protocol ReparameterizedWeight: AnyObject {
    func materializedLayer() -> AnyObject
    /// The layer it computes with (a convolution or linear layer).
    var wrappedLayer: AnyObject { get }
}

/// A layer whose output at position i is θ_c·patch_i for output channel c (a convolution via
/// im2col, or a linear layer with patch = input row): what cross-iteration BN needs to
/// differentiate the next layer's batch statistics with respect to θ analytically.
public protocol PatchSource<Scalar>: AnyObject {
    associatedtype Scalar: TensorScalar
    /// θ, viewed as C_out × K.
    var patchWeight: Parameter<Scalar> { get }
    /// The patches of the last training forward; nil before the first one and once backward
    /// has used them.
    var lastPatches: PatchMatrix<Scalar>? { get }
}

/// The M = N·P patches (K values each) of a batch, in one of two layouts.
public struct PatchMatrix<Scalar: TensorScalar> {
    public var values: [Scalar]
    public var batch: Int, patchSize: Int, positions: Int
    /// true: values[(n·P + p)·K + k], one patch per row (a linear layer's input);
    /// false: values[k·M + n·P + p], one patch per column (a convolution's im2col matrix).
    public var positionMajor: Bool

    public init(values: [Scalar], batch: Int, patchSize: Int, positions: Int, positionMajor: Bool) {
        precondition(values.count == batch * patchSize * positions, "PatchMatrix: \(values.count) values for \(batch)×\(patchSize)×\(positions)")
        self.values = values
        self.batch = batch
        self.patchSize = patchSize
        self.positions = positions
        self.positionMajor = positionMajor
    }
}

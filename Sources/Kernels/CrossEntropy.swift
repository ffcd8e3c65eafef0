/// Softmax cross-entropy of N×classes logits against integer labels.
///
/// Returns the summed loss (Double) over the rows, the count of correct first-maximum
/// predictions, and the gradient of `scale · Σ loss` with respect to the logits. With
/// scale = 1/(global batch size), the sum over ranks of these gradients is the gradient of the
/// global mean loss, for uneven shards too (DESIGN §3.3).
public func softmaxCrossEntropy<Scalar: TensorScalar>(logits: Tensor<Scalar>, labels: [Int32], scale: Scalar)
    throws -> (lossSum: Double, correct: Int, gradient: Tensor<Scalar>, fixedPoint: FixedPointLoss)
{
    guard logits.rank == 2, logits.shape[0] == labels.count else {
        throw LayerError("cross-entropy: logits \(logits.shape) do not match \(labels.count) labels")
    }
    let classes = logits.shape[1]
    if let bad = labels.first(where: { $0 < 0 || Int($0) >= classes }) {
        throw LayerError("cross-entropy: label \(bad) is outside 0..<\(classes)")
    }
    var gradient = Tensor<Scalar>(shape: logits.shape)
    let (lossSum, correct, fixed) = logits.scalars.withUnsafeBufferPointer { z in
        labels.withUnsafeBufferPointer { l in
            gradient.scalars.withUnsafeMutableBufferPointer { g in
                Scalar.softmaxCrossEntropy(z, labels: l, classes: classes, gradientScale: scale, gradient: g)
            }
        }
    }
    return (lossSum, correct, gradient, fixed)
}

/// A sum of per-sample losses that does not depend on the order of addition: each loss is
/// rounded to a multiple of 2⁻²⁴ (6e-8, far below the 4 decimals reported) and the integers are
/// added exactly, so a loss summed over ranks, batches and evaluation pieces is the same bits
/// however the samples were split. Losses that are not finite or not below 2²⁴ are counted
/// instead (a diverged run), so the sum never overflows.
public struct FixedPointLoss: Equatable, Sendable {
    public static let scale = Double(1 << 24)
    /// Σ round(loss·2²⁴) over the finite losses.
    public var units: Int64 = 0
    /// Losses that were NaN, infinite or ≥ 2²⁴.
    public var outOfRange: Int64 = 0

    public init() {}

    public mutating func add(_ loss: Double) {
        guard loss.isFinite && abs(loss) < Self.scale else { outOfRange += 1; return }
        units += Int64((loss * Self.scale).rounded())
    }

    /// The sum as a Double (NaN when any loss was out of range).
    public var value: Double { outOfRange > 0 ? .nan : Double(units) / Self.scale }
}

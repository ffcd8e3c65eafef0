/// Softmax cross-entropy of N×classes logits against integer labels.
///
/// Returns the summed loss (Double) over the rows, the count of correct first-maximum
/// predictions, and the gradient of `scale · Σ loss` with respect to the logits. With
/// scale = 1/(global batch size), the sum over ranks of these gradients is the gradient of the
/// global mean loss, for uneven shards too (DESIGN §3.3).
public func softmaxCrossEntropy<Scalar: TensorScalar>(logits: Tensor<Scalar>, labels: [Int32], scale: Scalar)
    throws -> (lossSum: Double, correct: Int, gradient: Tensor<Scalar>)
{
    guard logits.rank == 2, logits.shape[0] == labels.count else {
        throw LayerError("cross-entropy: logits \(logits.shape) do not match \(labels.count) labels")
    }
    let classes = logits.shape[1]
    if let bad = labels.first(where: { $0 < 0 || Int($0) >= classes }) {
        throw LayerError("cross-entropy: label \(bad) is outside 0..<\(classes)")
    }
    var gradient = Tensor<Scalar>(shape: logits.shape)
    let (lossSum, correct) = logits.scalars.withUnsafeBufferPointer { z in
        labels.withUnsafeBufferPointer { l in
            gradient.scalars.withUnsafeMutableBufferPointer { g in
                Scalar.softmaxCrossEntropy(z, labels: l, classes: classes, gradientScale: scale, gradient: g)
            }
        }
    }
    return (lossSum, correct, gradient)
}

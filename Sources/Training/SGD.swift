import Kernels

/// Stochastic gradient descent with momentum and weight decay, PyTorch's formulation:
///
///     g ← ∇ + λ·p;   b ← μ·b + g;   p ← p − η·b
///
/// The momentum buffer b starts at zero, which makes the first step b = g exactly as PyTorch's
/// lazily created buffer. Weight decay applies to every parameter (PyTorch's default).
public final class SGD {
    public var learningRate: Float
    public let momentum: Float
    public let weightDecay: Float
    /// Momentum buffers by parameter name (saved in checkpoints as `optimizer.momentum_buffer.NAME`).
    public private(set) var momentumBuffers: [String: [Float]] = [:]

    public init(learningRate: Float, momentum: Float = 0.9, weightDecay: Float = 0) {
        self.learningRate = learningRate
        self.momentum = momentum
        self.weightDecay = weightDecay
    }

    public func step(_ parameters: [(name: String, parameter: Parameter<Float>)]) {
        for (name, parameter) in parameters {
            var buffer = momentumBuffers[name] ?? [Float](repeating: 0, count: parameter.value.count)
            let lr = learningRate, mu = momentum, wd = weightDecay
            parameter.value.scalars.withUnsafeMutableBufferPointer { p in
                parameter.gradient.scalars.withUnsafeBufferPointer { g in
                    buffer.withUnsafeMutableBufferPointer { b in
                        for i in 0..<p.count {
                            let grad = g[i] + wd * p[i]
                            b[i] = mu * b[i] + grad
                            p[i] -= lr * b[i]
                        }
                    }
                }
            }
            momentumBuffers[name] = buffer
        }
    }

    /// Restores a buffer from a checkpoint.
    public func setMomentumBuffer(_ values: [Float], for name: String) {
        momentumBuffers[name] = values
    }
}

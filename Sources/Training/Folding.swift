import Kernels
import Normalization

extension Network {
    /// The inference network with every normalization whose inference is a per-channel affine
    /// map (``NormalizationLayer/inferenceAffine()``: BN, SyncBN, CBN, BRN, MABN with their running
    /// statistics; mean-only BN; weight normalization's bias) folded into the convolution or linear
    /// layer before it (a weight-normalized or weight-centralized layer is made plain first):
    ///
    ///     W'_c = W_c·scale_c,   b'_c = (b_c − mean_c)·scale_c + β_c,   scale_c = γ_c/√(var_c + ε) for BN
    ///
    /// computed in Double. The folded layers are new; the other layers are shared with this
    /// network (they hold no parameters). A BN not preceded by a conv or linear layer is an error.
    /// Inside residual blocks and `Sequential`s each branch is folded on its own.
    public func foldingBatchNorm() throws -> Network {
        Network(layers: try Self.folding(layers))
    }

    private static func folding(_ layers: [(name: String, layer: any Layer<Float>)]) throws -> [(name: String, layer: any Layer<Float>)] {
        var folded: [(name: String, layer: any Layer<Float>)] = []
        for (name, layer) in layers {
            if let block = layer as? ResidualBlock<Float> {
                let residual = Sequential<Float>(try folding(block.residual.children))
                let shortcut = try block.shortcut.map { Sequential<Float>(try folding($0.children)) }
                folded.append((name, ResidualBlock<Float>(residual: residual, shortcut: shortcut)))
                continue
            }
            if let sequence = layer as? Sequential<Float> {
                folded.append((name, Sequential<Float>(try folding(sequence.children))))
                continue
            }
            // A normalization whose inference is per-channel affine (BN and its variants, mean-only
            // BN, weight normalization's bias, MABN) folds into the layer before it; a reparameterized
            // weight (weight normalization, weight centralization) is materialized first.
            let inference: InferenceAffine?
            do { inference = try (layer as? NormalizationLayer)?.inferenceAffine() } catch { throw LayerError("cannot fold \(name): \(error)") }
            guard let affine = inference else {
                folded.append((name, layer))
                continue
            }
            guard let previous = folded.last else { throw LayerError("cannot fold \(name): nothing before it") }
            var producer: AnyObject = previous.layer
            if let reparameterized = producer as? ReparameterizedWeight { producer = reparameterized.materializedLayer() }
            let channels = affine.scale.count
            func foldedParameters(_ weight: Tensor<Float>, _ bias: Tensor<Float>?) -> (Tensor<Float>, Tensor<Float>) {
                let perChannel = weight.count / channels
                var w = [Float](repeating: 0, count: weight.count)
                for i in 0..<weight.count { w[i] = Float(Double(weight.scalars[i]) * affine.scale[i / perChannel]) }
                var b = [Float](repeating: 0, count: channels)
                for c in 0..<channels {
                    let original: Double = bias.map { Double($0.scalars[c]) } ?? 0
                    b[c] = Float((original - affine.mean[c]) * affine.scale[c] + affine.beta[c])
                }
                return (Tensor(shape: weight.shape, scalars: w), Tensor(shape: [channels], scalars: b))
            }
            switch producer {
            case let conv as Conv2d<Float> where conv.outputChannels == channels:
                let (w, b) = foldedParameters(conv.weight.value, conv.bias?.value)
                folded[folded.count - 1].layer = Conv2d<Float>(weight: w, bias: b, stride: conv.stride, padding: conv.padding)
            case let linear as Linear<Float> where linear.outputFeatures == channels:
                let (w, b) = foldedParameters(linear.weight.value, linear.bias?.value)
                folded[folded.count - 1].layer = Linear<Float>(weight: w, bias: b)
            default:
                throw LayerError("cannot fold \(name): it does not follow a convolution or linear layer")
            }
        }
        return folded
    }
}

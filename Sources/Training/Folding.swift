import Kernels
import Normalization

extension Network {
    /// The inference network with every BatchNorm (BN, SyncBN, CBN; inference mode, running
    /// statistics) folded into the convolution or linear layer before it (and every
    /// weight-normalized layer with its bias or mean-only BN made a plain layer with a bias):
    ///
    ///     W'_c = W_c·γ_c/√(var_c + ε),   b'_c = (b_c − mean_c)·γ_c/√(var_c + ε) + β_c
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
            // Weight normalization with its bias or mean-only BN: w = g·v/‖v‖ and
            // b = β (− running mean) become a plain layer with a bias.
            if layer is ChannelBias<Float> || layer is MeanOnlyBatchNorm<Float>, let previous = folded.last {
                let beta = ((layer as? ChannelBias<Float>)?.bias ?? (layer as! MeanOnlyBatchNorm<Float>).bias).value.scalars
                let mean = (layer as? MeanOnlyBatchNorm<Float>)?.runningMean.value.scalars ?? [Float](repeating: 0, count: beta.count)
                let bias = Tensor<Float>(shape: [beta.count], scalars: (0..<beta.count).map { Float(Double(beta[$0]) - Double(mean[$0])) })
                if let wn = previous.layer as? WeightNorm<Float, Conv2d<Float>> {
                    wn.materializeWeight()
                    folded[folded.count - 1].layer = Conv2d<Float>(weight: wn.layer.weight.value, bias: bias, stride: wn.layer.stride, padding: wn.layer.padding)
                    continue
                }
                if let wn = previous.layer as? WeightNorm<Float, Linear<Float>> {
                    wn.materializeWeight()
                    folded[folded.count - 1].layer = Linear<Float>(weight: wn.layer.weight.value, bias: bias)
                    continue
                }
            }
            guard let bn = layer as? BatchNorm<Float> else {
                folded.append((name, layer))
                continue
            }
            guard let previous = folded.last else { throw LayerError("cannot fold \(name): nothing before it") }
            let gamma = bn.weight.value.scalars.map(Double.init), beta = bn.bias.value.scalars.map(Double.init)
            let mean = bn.runningMean.value.scalars.map(Double.init), variance = bn.runningVariance.value.scalars.map(Double.init)
            if let bad = variance.firstIndex(where: { !($0 + bn.epsilon > 0) || !$0.isFinite }) {
                throw LayerError("cannot fold \(name): its running variance of channel \(bad) is \(variance[bad]); a variance must be ≥ 0")
            }
            let scale = (0..<bn.featureCount).map { gamma[$0] / (variance[$0] + bn.epsilon).squareRoot() }
            func foldedParameters(_ weight: Tensor<Float>, _ bias: Tensor<Float>?) -> (Tensor<Float>, Tensor<Float>) {
                let perChannel = weight.count / bn.featureCount
                var w = [Float](repeating: 0, count: weight.count)
                for i in 0..<weight.count { w[i] = Float(Double(weight.scalars[i]) * scale[i / perChannel]) }
                var b = [Float](repeating: 0, count: bn.featureCount)
                for c in 0..<bn.featureCount {
                    let original: Double = bias.map { Double($0.scalars[c]) } ?? 0
                    b[c] = Float((original - mean[c]) * scale[c] + beta[c])
                }
                return (Tensor(shape: weight.shape, scalars: w), Tensor(shape: [bn.featureCount], scalars: b))
            }
            switch previous.layer {
            case let conv as Conv2d<Float>:
                let (w, b) = foldedParameters(conv.weight.value, conv.bias?.value)
                folded[folded.count - 1].layer = Conv2d<Float>(weight: w, bias: b, stride: conv.stride, padding: conv.padding)
            case let linear as Linear<Float>:
                let (w, b) = foldedParameters(linear.weight.value, linear.bias?.value)
                folded[folded.count - 1].layer = Linear<Float>(weight: w, bias: b)
            default:
                throw LayerError("cannot fold \(name): it does not follow a convolution or linear layer")
            }
        }
        return folded
    }
}

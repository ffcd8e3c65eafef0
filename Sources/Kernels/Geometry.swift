/// The sizes of one 2-D convolution applied to one C×H×W sample.
public struct ConvolutionGeometry: Equatable {
    public let inputChannels: Int, height: Int, width: Int
    public let kernelHeight: Int, kernelWidth: Int
    public let stride: Int, padding: Int

    public init(inputChannels: Int, height: Int, width: Int, kernelHeight: Int, kernelWidth: Int, stride: Int, padding: Int) {
        self.inputChannels = inputChannels
        self.height = height
        self.width = width
        self.kernelHeight = kernelHeight
        self.kernelWidth = kernelWidth
        self.stride = stride
        self.padding = padding
    }

    public var outputHeight: Int { (height + 2 * padding - kernelHeight) / stride + 1 }
    public var outputWidth: Int { (width + 2 * padding - kernelWidth) / stride + 1 }
    /// Rows of the im2col matrix: C_in·k_h·k_w.
    public var patchSize: Int { inputChannels * kernelHeight * kernelWidth }
    /// Columns of the im2col matrix: H_out·W_out.
    public var positions: Int { outputHeight * outputWidth }

    /// Σ over the output positions of each im2col row (K = ``patchSize`` values in its order
    /// c_in, kernel row, kernel column; padding counts zero), summed over `samples` consecutive
    /// samples of `x` (N × C_in × H × W), in Double. For each input channel and kernel row a, the
    /// input rows it reads (oh·stride − padding + a) are added per column into `scratch`
    /// (``width`` values), and each kernel column b sums the columns it reads: k_h·H_out·W
    /// additions per channel instead of the K·P of the product with a row of ones.
    public func patchSums(_ x: UnsafePointer<Float>, samples: Int, into sums: UnsafeMutablePointer<Double>,
                          scratch: UnsafeMutablePointer<Double>) {
        let plane = height * width
        for ci in 0..<inputChannels {
            for a in 0..<kernelHeight {
                scratch.update(repeating: 0, count: width)
                for i in 0..<samples {
                    let base = x + (i * inputChannels + ci) * plane
                    for oh in 0..<outputHeight {
                        let r = oh * stride - padding + a
                        guard r >= 0 && r < height else { continue }
                        let row = base + r * width
                        for column in 0..<width { scratch[column] += Double(row[column]) }
                    }
                }
                for b in 0..<kernelWidth {
                    var total = 0.0
                    for ow in 0..<outputWidth {
                        let column = ow * stride - padding + b
                        if column >= 0 && column < width { total += scratch[column] }
                    }
                    sums[(ci * kernelHeight + a) * kernelWidth + b] = total
                }
            }
        }
    }
}

/// The sizes of a 2-D pooling window applied to H×W planes.
public struct PoolingGeometry: Equatable {
    public let height: Int, width: Int, kernel: Int, stride: Int, padding: Int

    public init(height: Int, width: Int, kernel: Int, stride: Int, padding: Int = 0) {
        self.height = height
        self.width = width
        self.kernel = kernel
        self.stride = stride
        self.padding = padding
    }

    public var outputHeight: Int { (height + 2 * padding - kernel) / stride + 1 }
    public var outputWidth: Int { (width + 2 * padding - kernel) / stride + 1 }
}

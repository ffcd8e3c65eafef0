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

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
    /// samples of `x` (N × C_in × H × W), in Double. Kernel row a reads the input rows
    /// oh·stride − padding + a (oh < H_out) inside the image: kernel rows with the same residue
    /// mod stride read overlapping runs of the same rows, so the run they all read is summed per
    /// column once and each kernel row adds only its own rows beyond it (additions only, in a fixed
    /// order); then each kernel column b sums the columns it reads. About H·W additions per
    /// channel and sample instead of the K·P of the product with a row of ones. `scratch` holds
    /// ``patchSumScratchCount`` values.
    public func patchSums(_ x: UnsafePointer<Float>, samples: Int, into sums: UnsafeMutablePointer<Double>,
                          scratch: UnsafeMutablePointer<Double>) {
        let plane = height * width
        let shared = scratch, own = scratch + width
        // Rows kernel row a reads: first..last in steps of stride (empty when first > last).
        func rows(_ a: Int) -> (first: Int, last: Int) {
            var first = a - padding, last = a - padding + (outputHeight - 1) * stride
            if first < 0 { first += (-first + stride - 1) / stride * stride }
            if last >= height { last -= (last - height + 1 + stride - 1) / stride * stride }
            return (first, last)
        }
        func addRows(_ from: Int, _ to: Int, channel ci: Int, into target: UnsafeMutablePointer<Double>) {
            guard from <= to else { return }
            for i in 0..<samples {
                let base = x + (i * inputChannels + ci) * plane
                for r in Swift.stride(from: from, through: to, by: stride) {
                    let row = base + r * width
                    for column in 0..<width { target[column] += Double(row[column]) }
                }
            }
        }
        for ci in 0..<inputChannels {
            for residue in 0..<min(stride, kernelHeight) {
                // The run every kernel row of the group reads (rows of one residue class).
                var commonFirst = Int.min, commonLast = Int.max
                for a in Swift.stride(from: residue, to: kernelHeight, by: stride) {
                    let r = rows(a)
                    if r.first <= r.last { commonFirst = max(commonFirst, r.first); commonLast = min(commonLast, r.last) }
                }
                if commonFirst == Int.min { commonFirst = 0; commonLast = -1 }
                shared.update(repeating: 0, count: width)
                addRows(commonFirst, commonLast, channel: ci, into: shared)
                for a in Swift.stride(from: residue, to: kernelHeight, by: stride) {
                    let r = rows(a)
                    if r.first <= r.last && commonFirst <= commonLast {
                        own.update(from: shared, count: width)
                        addRows(r.first, commonFirst - stride, channel: ci, into: own)
                        addRows(commonLast + stride, r.last, channel: ci, into: own)
                    } else {
                        // No run shared with the group's other rows (or no rows at all).
                        own.update(repeating: 0, count: width)
                        addRows(r.first, r.last, channel: ci, into: own)
                    }
                    for b in 0..<kernelWidth {
                        // Columns ow·stride − padding + b inside the image, four partial sums.
                        let first = b >= padding ? 0 : (padding - b + stride - 1) / stride
                        let span = width - 1 + padding - b, last = span < 0 ? -1 : min(outputWidth - 1, span / stride)
                        var partial = (0.0, 0.0, 0.0, 0.0)
                        var ow = first
                        while ow + 3 <= last {
                            let column = own + (ow * stride - padding + b)
                            partial.0 += column[0]
                            partial.1 += column[stride]
                            partial.2 += column[2 * stride]
                            partial.3 += column[3 * stride]
                            ow += 4
                        }
                        while ow <= last { partial.0 += own[ow * stride - padding + b]; ow += 1 }
                        sums[(ci * kernelHeight + a) * kernelWidth + b] = (partial.0 + partial.1) + (partial.2 + partial.3)
                    }
                }
            }
        }
    }

    /// Doubles of scratch ``patchSums(_:samples:into:scratch:)`` needs.
    public var patchSumScratchCount: Int { 2 * width }
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

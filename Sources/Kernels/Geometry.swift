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

/// Σ over the output positions of each im2col row of a geometry (K = ``ConvolutionGeometry/patchSize``
/// values in its order c_in, kernel row, kernel column; padding counts zero), summed over samples,
/// in Double: the patch sums behind cross-iteration BN's ∂S1/∂θ, read from the input itself.
///
/// Kernel row a reads the input rows oh·stride − padding + a (oh < H_out) inside the image: the
/// rows of one residue class mod stride except a few at its ends, and kernel column b likewise
/// the columns of one class. So each kernel position's sum is the sum over its row class × column
/// class, less the rows and the columns it misses, plus their crossings. Per channel and sample
/// that is one pass over the plane (each row's sums per column class) and a column sum of H values
/// for each of the few missed columns: about H·W additions in all, whatever the kernel, instead of
/// the K·P of a product with a row of ones. The plan (which rows and columns each kernel position
/// misses) depends on the geometry alone and is made once; the order of every operation is fixed,
/// so a sample's sums are the same on any rank.
public struct PatchSumPlan {
    public let geometry: ConvolutionGeometry
    /// The distinct missed columns, whose sums over each row class are taken per plane.
    private let columns: [Int]
    /// Per kernel position that reads anything: its index in the sums, its grid cell and the
    /// ends in `terms` of the row sums to subtract, of the column sums to subtract and of the
    /// crossings (plane offsets) to add back, which follow one another from the previous end.
    private let recipe: [(output: Int, grid: Int, rowsEnd: Int, columnsEnd: Int, crossingsEnd: Int)]
    private let terms: [Int]

    public init(_ g: ConvolutionGeometry) {
        geometry = g
        let s = g.stride, p = g.padding
        // The class, the first and last index read, and the missed members of a kernel offset.
        func plan(_ offset: Int, extent: Int, outputs: Int) -> (residue: Int, reads: Bool, missed: [Int]) {
            let residue = ((offset - p) % s + s) % s
            var first = offset - p, last = offset - p + (outputs - 1) * s
            if first < 0 { first += (-first + s - 1) / s * s }
            if last >= extent { last -= (last - extent + 1 + s - 1) / s * s }
            guard outputs > 0, first <= last else { return (residue, false, []) }
            let missed = Array(Swift.stride(from: residue, to: first, by: s)) + Array(Swift.stride(from: last + s, to: extent, by: s))
            return (residue, true, missed)
        }
        let rows = (0..<g.kernelHeight).map { plan($0, extent: g.height, outputs: g.outputHeight) }
        let kernelColumns = (0..<g.kernelWidth).map { plan($0, extent: g.width, outputs: g.outputWidth) }
        var columns: [Int] = []
        for c in kernelColumns { for q in c.missed where !columns.contains(q) { columns.append(q) } }
        var recipe: [(output: Int, grid: Int, rowsEnd: Int, columnsEnd: Int, crossingsEnd: Int)] = [], terms: [Int] = []
        for (a, r) in rows.enumerated() where r.reads {
            for (b, c) in kernelColumns.enumerated() where c.reads {
                terms += r.missed.map { c.residue * g.height + $0 }
                let rowsEnd = terms.count
                terms += c.missed.map { columns.firstIndex(of: $0)! * s + r.residue }
                let columnsEnd = terms.count
                for q in r.missed { terms += c.missed.map { q * g.width + $0 } }
                recipe.append((a * g.kernelWidth + b, r.residue * s + c.residue, rowsEnd, columnsEnd, terms.count))
            }
        }
        (self.columns, self.recipe, self.terms) = (columns, recipe, terms)
    }

    /// Doubles of scratch ``sums(_:samples:into:scratch:)`` needs.
    public var scratchCount: Int { geometry.stride * (geometry.height + geometry.stride + columns.count) }

    /// The patch sums of `samples` consecutive samples of `x` (N × C_in × H × W), added in sample
    /// order, into `sums` (K values).
    public func sums(_ x: UnsafePointer<Float>, samples: Int, into sums: UnsafeMutablePointer<Double>, scratch: UnsafeMutablePointer<Double>) {
        let g = geometry, s = g.stride, H = g.height, W = g.width, kh = g.kernelHeight, kw = g.kernelWidth
        // rowSums[κ·H + r]: row r over column class κ; grid[ρ·s + κ]: row class ρ × column class κ;
        // columnSums[j·s + ρ]: missed column j over row class ρ.
        let rowSums = scratch, grid = scratch + s * H, columnSums = grid + s * s
        sums.update(repeating: 0, count: g.patchSize)
        let missed = columns.count
        for i in 0..<samples {
            for ci in 0..<g.inputChannels {
                let plane = x + (i * g.inputChannels + ci) * H * W
                // Each row's sums per column class; then, in registers (no sum carried
                // through memory from row to row), the grid cells and the missed columns' sums.
                for r in 0..<H { Self.rowSums(plane + r &* W, width: W, stride: s, into: rowSums + r, step: H) }
                for rho in 0..<s {
                    for kappa in 0..<s {
                        var total = 0.0, r = rho
                        while r < H { total += rowSums[kappa &* H &+ r]; r = r &+ s }
                        grid[rho &* s &+ kappa] = total
                    }
                    for j in 0..<missed {
                        let column = plane + columns[j]
                        var total = 0.0, r = rho
                        while r < H { total += Double(column[r &* W]); r = r &+ s }
                        columnSums[j &* s &+ rho] = total
                    }
                }
                var start = 0
                for step in recipe {
                    // The cell, less the missed rows and columns, plus their crossings, in that order.
                    var total = grid[step.grid]
                    for t in start..<step.rowsEnd { total -= rowSums[terms[t]] }
                    for t in step.rowsEnd..<step.columnsEnd { total -= columnSums[terms[t]] }
                    for t in step.columnsEnd..<step.crossingsEnd { total += Double(plane[terms[t]]) }
                    sums[ci * kh * kw + step.output] += total
                    start = step.crossingsEnd
                }
            }
        }
    }

    /// One row's sum over each column class mod `stride`, into `target[κ·step]`.
    @inline(__always)
    private static func rowSums(_ row: UnsafePointer<Float>, width: Int, stride s: Int, into target: UnsafeMutablePointer<Double>, step: Int) {
        if s == 1 {
            let raw = UnsafeRawPointer(row)
            var partial = SIMD4<Double>()
            var q = 0
            while q &+ 4 <= width {
                partial += SIMD4<Double>(raw.loadUnaligned(fromByteOffset: q &* MemoryLayout<Float>.stride, as: SIMD4<Float>.self))
                q = q &+ 4
            }
            var total = (partial[0] + partial[1]) + (partial[2] + partial[3])
            while q < width { total += Double(row[q]); q = q &+ 1 }
            target[0] = total
        } else {
            for kappa in 0..<s {
                var total = 0.0
                var q = kappa
                while q < width { total += Double(row[q]); q = q &+ s }
                target[kappa &* step] = total
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

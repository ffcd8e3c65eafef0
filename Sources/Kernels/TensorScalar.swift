import COpenBLAS
import CDNNL

/// Float or Double: the element types of tensors.
///
/// Layers are generic so that gradient checks can run in Double while training runs in Float.
/// The per-element loops are static requirements of this protocol with default implementations
/// (here and in `KernelLoops.swift`); because Float and Double conform in this module, their
/// witnesses are compiled specialised, and a generic layer in another module reaches a
/// specialised loop through one indirect call per kernel, not one per element.
public protocol TensorScalar: BinaryFloatingPoint, Codable, Sendable where Self.RawSignificand: FixedWidthInteger {
    /// NumPy's dtype string for this type (`<f4`, `<f8`).
    static var numpyDescriptor: String { get }
    /// safetensors' dtype name (`F32`, `F64`).
    static var safetensorsDType: String { get }

    /// C ← alpha·op(A)·op(B) + beta·C, row-major (cblas_sgemm / cblas_dgemm).
    /// op(A) is m×k, op(B) is k×n, C is m×n.
    static func gemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Self,
                     a: UnsafePointer<Self>, lda: Int, b: UnsafePointer<Self>, ldb: Int,
                     beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)

    static func im2col(_ image: UnsafePointer<Self>, _ geometry: ConvolutionGeometry, into columns: UnsafeMutablePointer<Self>, rowLength: Int)
    static func col2imAccumulate(_ columns: UnsafePointer<Self>, _ geometry: ConvolutionGeometry, rowLength: Int, into image: UnsafeMutablePointer<Self>)
    static func swapOuterAxes(_ source: UnsafePointer<Self>, _ a: Int, _ b: Int, block: Int, into target: UnsafeMutablePointer<Self>)
    static func addChannelBias(_ bias: UnsafeBufferPointer<Self>, to output: UnsafeMutableBufferPointer<Self>, layout: ChannelLayout)
    static func channelSums(_ values: UnsafeBufferPointer<Self>, layout: ChannelLayout, into sums: UnsafeMutableBufferPointer<Self>)
    static func reluForward(_ x: UnsafeBufferPointer<Self>, _ y: UnsafeMutableBufferPointer<Self>)
    static func reluBackward(_ y: UnsafeBufferPointer<Self>, _ dy: UnsafeBufferPointer<Self>, _ dx: UnsafeMutableBufferPointer<Self>)
    /// y ← max(y + s, 0) (a residual sum and its ReLU in one pass; NaN propagates).
    static func addReLU(_ s: UnsafeBufferPointer<Self>, into y: UnsafeMutableBufferPointer<Self>)
    /// y ← y + s.
    static func add(_ s: UnsafeBufferPointer<Self>, into y: UnsafeMutableBufferPointer<Self>)
    static func maxPoolForward(_ x: UnsafeBufferPointer<Self>, _ geometry: PoolingGeometry, planes: Int, _ y: UnsafeMutableBufferPointer<Self>, argmax: UnsafeMutableBufferPointer<Int32>)
    static func maxPoolBackward(_ dy: UnsafeBufferPointer<Self>, argmax: UnsafeBufferPointer<Int32>, _ geometry: PoolingGeometry, planes: Int, _ dx: UnsafeMutableBufferPointer<Self>)
    static func averagePoolForward(_ x: UnsafeBufferPointer<Self>, _ geometry: PoolingGeometry, planes: Int, _ y: UnsafeMutableBufferPointer<Self>)
    static func averagePoolBackward(_ dy: UnsafeBufferPointer<Self>, _ geometry: PoolingGeometry, planes: Int, _ dx: UnsafeMutableBufferPointer<Self>)
    static func globalAveragePoolForward(_ x: UnsafeBufferPointer<Self>, planes: Int, spatial: Int, _ y: UnsafeMutableBufferPointer<Self>)
    static func globalAveragePoolBackward(_ dy: UnsafeBufferPointer<Self>, planes: Int, spatial: Int, _ dx: UnsafeMutableBufferPointer<Self>)
    static func softmaxCrossEntropy(_ logits: UnsafeBufferPointer<Self>, labels: UnsafeBufferPointer<Int32>, classes: Int,
                                    gradientScale: Self, gradient: UnsafeMutableBufferPointer<Self>) -> (lossSum: Double, correct: Int, fixedPoint: FixedPointLoss)
    /// target[i] = Double(source[i]) for i < count (a specialised loop, for generic layers).
    static func widen(_ source: UnsafePointer<Self>, count: Int, into target: UnsafeMutablePointer<Double>)
    /// target[o·n + i] = a[o]·b[i]: the outer product of m and n values (a linear layer's
    /// per-sample weight gradient).
    static func outerProduct(_ a: UnsafePointer<Self>, m: Int, _ b: UnsafePointer<Self>, n: Int, into target: UnsafeMutablePointer<Self>)
    /// True when every element is finite.
    static func allFinite(_ x: UnsafeBufferPointer<Self>) -> Bool
    /// `count` copies of `value` (a specialised fill: generic code in other modules would copy
    /// element by element through value witnesses).
    static func filled(_ count: Int, with value: Self) -> [Self]
    /// The values as Doubles (a specialised loop, for generic code in other modules).
    static func widened(_ values: [Self]) -> [Double]
    /// Doubles rounded to this type.
    static func narrowed(_ values: [Double]) -> [Self]
    /// target[i] = Self(source[i]), rounded to nearest.
    static func narrow(_ source: UnsafePointer<Double>, count: Int, into target: UnsafeMutablePointer<Self>)
    /// The process's pool of scratch arrays of this type (``PairwiseAccumulator``'s levels).
    static var scratchArrays: ScratchArrays<Self> { get }
}

extension Float: TensorScalar {
    public static var numpyDescriptor: String { "<f4" }
    public static var safetensorsDType: String { "F32" }
    public static let scratchArrays = ScratchArrays<Float>()

    public static func gemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Float,
                            a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
                            beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
        guard m > 0, n > 0 else { return }
        cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }
}

extension Double: TensorScalar {
    public static var numpyDescriptor: String { "<f8" }
    public static var safetensorsDType: String { "F64" }
    public static let scratchArrays = ScratchArrays<Double>()

    public static func gemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Double,
                            a: UnsafePointer<Double>, lda: Int, b: UnsafePointer<Double>, ldb: Int,
                            beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int) {
        guard m > 0, n > 0 else { return }
        cblas_dgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }
}

/// Sets the number of threads OpenBLAS and oneDNN may use (1 per rank when ranks share a machine).
public func setGEMMThreads(_ count: Int) {
    openblas_set_num_threads(Int32(count))
    syncbn_dnnl_set_threads(Int32(count))
}

// Float witnesses for the element-wise activations: eight lanes at a time with SIMD masks
// (the generic loops do not vectorize: the compiler cannot rule out that dx aliases dy).
extension Float {
    public static func reluForward(_ x: UnsafeBufferPointer<Float>, _ y: UnsafeMutableBufferPointer<Float>) {
        guard let xp = x.baseAddress, let yp = y.baseAddress else { return }
        let count = x.count
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(xp + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(yp + i).storeBytes(of: v.replacing(with: 0, where: v .<= 0), as: SIMD8<Float>.self)
            i += 8
        }
        while i < count { yp[i] = xp[i] <= 0 ? 0 : xp[i]; i += 1 }
    }

    public static func reluBackward(_ y: UnsafeBufferPointer<Float>, _ dy: UnsafeBufferPointer<Float>, _ dx: UnsafeMutableBufferPointer<Float>) {
        guard let yp = y.baseAddress, let gp = dy.baseAddress, let dp = dx.baseAddress else { return }
        let count = y.count
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(yp + i).loadUnaligned(as: SIMD8<Float>.self)
            let g = UnsafeRawPointer(gp + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(dp + i).storeBytes(of: g.replacing(with: 0, where: v .<= 0), as: SIMD8<Float>.self)
            i += 8
        }
        while i < count { dp[i] = yp[i] <= 0 ? 0 : gp[i]; i += 1 }
    }

    public static func addReLU(_ s: UnsafeBufferPointer<Float>, into y: UnsafeMutableBufferPointer<Float>) {
        guard let sp = s.baseAddress, let yp = y.baseAddress else { return }
        let count = y.count
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(yp + i).loadUnaligned(as: SIMD8<Float>.self) + UnsafeRawPointer(sp + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(yp + i).storeBytes(of: v.replacing(with: 0, where: v .<= 0), as: SIMD8<Float>.self)
            i += 8
        }
        while i < count { let v = yp[i] + sp[i]; yp[i] = v <= 0 ? 0 : v; i += 1 }
    }

    public static func add(_ s: UnsafeBufferPointer<Float>, into y: UnsafeMutableBufferPointer<Float>) {
        guard let sp = s.baseAddress, let yp = y.baseAddress else { return }
        let count = y.count
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(yp + i).loadUnaligned(as: SIMD8<Float>.self) + UnsafeRawPointer(sp + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(yp + i).storeBytes(of: v, as: SIMD8<Float>.self)
            i += 8
        }
        while i < count { yp[i] += sp[i]; i += 1 }
    }
}

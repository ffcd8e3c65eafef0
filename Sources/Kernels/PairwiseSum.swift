// The fixed summation tree of the exactness contract (docs/design.md, "Exact on any number of
// ranks"): every sum over the samples of a batch is a balanced binary tree over the sample index,
// leaf i being sample i's own contribution (computed from that sample alone, the same way on any
// rank). The tree over n leaves is the one over the next power of two with the missing leaves
// left out: level by level, node [i, i + 2d) = node [i, i + d) + node [i + d, i + 2d) where the
// right half exists. A rank whose samples are an aligned block of 2^j global indices computes
// exactly the subtree of that block, and the ranks then combine their subtrees along the same tree
// (Collectives' `rankTreeSum`), so the whole sum does not depend on how the batch was split.

extension TensorScalar {
    /// The pairwise tree sum of `count` leaves of `width` values each (leaf i at
    /// `leaves + i·stride`), destroying the leaves; the total is left in leaf 0. No leaves: nothing.
    public static func pairwiseSumInPlace(_ leaves: UnsafeMutablePointer<Self>, count: Int, width: Int, stride: Int) {
        var distance = 1
        while distance < count {
            var i = 0
            while i + distance < count {
                add(UnsafeBufferPointer(start: leaves + (i + distance) * stride, count: width),
                    into: UnsafeMutableBufferPointer(start: leaves + i * stride, count: width))
                i += 2 * distance
            }
            distance *= 2
        }
    }

    /// The pairwise tree sum over `count` rows of `width` Doubles (row i at `leaves + i·stride`),
    /// each leaf first multiplied by `scale[j]` per column (when given) and rounded to this type:
    /// a parameter gradient whose per-sample parts were computed in Double (BN's dγ = Σdy·x̂).
    public static func pairwiseSum(ofRounded leaves: UnsafePointer<Double>, count: Int, width: Int, stride: Int,
                                   scale: [Double]? = nil) -> [Self] {
        guard count > 0 else { return filled(width, with: 0) }
        var rounded = filled(count * width, with: 0)
        rounded.withUnsafeMutableBufferPointer { r in
            for i in 0..<count {
                for j in 0..<width { r[i * width + j] = Self(leaves[i * stride + j] * (scale?[j] ?? 1)) }
            }
            pairwiseSumInPlace(r.baseAddress!, count: count, width: width, stride: width)
        }
        return Array(rounded[0..<width])
    }
}

/// Adds leaves one at a time in the canonical pairwise order with memory for O(log n) partial
/// sums (a binary counter: level j holds the sum of the last complete block of 2^j leaves), for
/// leaves too large to keep all at once (a convolution's per-sample weight gradient).
///
/// Buffers are kept between uses, so a layer that reuses its accumulator allocates nothing after
/// its first batch.
public struct PairwiseAccumulator<Scalar: TensorScalar> {
    public let width: Int
    private var levels: [[Scalar]] = []
    private var occupied: [Bool] = []
    /// The leaf being written, and afterwards the carry travelling up the levels.
    private var carry: [Scalar]
    public private(set) var count = 0

    public init(width: Int) {
        self.width = width
        carry = Scalar.filled(width, with: 0)
    }

    /// Forgets every leaf (keeps the buffers).
    public mutating func reset() {
        for j in occupied.indices { occupied[j] = false }
        count = 0
    }

    /// Adds the next leaf, which `write` puts into the buffer it is given (`width` values,
    /// contents undefined on entry).
    public mutating func add(_ write: (UnsafeMutablePointer<Scalar>) -> Void) {
        carry.withUnsafeMutableBufferPointer { write($0.baseAddress!) }
        carryUp(from: 0)
    }

    /// Puts the carry (the newest complete block, ending with the newest leaf) at level `start`,
    /// merging it with the blocks before it on the way up; counts the leaf.
    private mutating func carryUp(from start: Int) {
        var level = start
        while level < occupied.count && occupied[level] {
            // levels[level] holds the block just before this one: left + right.
            levels[level].withUnsafeMutableBufferPointer { left in
                carry.withUnsafeBufferPointer { right in Scalar.add(right, into: left) }
            }
            swap(&levels[level], &carry)
            occupied[level] = false
            level += 1
        }
        if level == occupied.count {
            levels.append(Scalar.filled(width, with: 0))
            occupied.append(false)
        }
        swap(&levels[level], &carry)
        occupied[level] = true
        count += 1
    }

    /// The total of the leaves added since the last reset, computed in the accumulator's own leaf
    /// buffer (free between leaves) and handed to `body`: no buffer of the caller's.
    public mutating func withTotal<R>(_ body: (UnsafePointer<Scalar>) -> R) -> R {
        var scratch: [Scalar] = []
        swap(&scratch, &carry)
        defer { swap(&scratch, &carry) }
        return scratch.withUnsafeMutableBufferPointer { t in
            total(into: t.baseAddress!)
            return body(t.baseAddress!)
        }
    }

    /// The total of the leaves added since the last reset, into `target` (`width` values; zeros
    /// when there were none): the partial blocks combined from the latest (rightmost) up.
    public mutating func total(into target: UnsafeMutablePointer<Scalar>) {
        var have = false
        for level in levels.indices where occupied[level] {
            if have {
                levels[level].withUnsafeMutableBufferPointer { left in
                    Scalar.add(UnsafeBufferPointer(start: target, count: width), into: left)
                    target.update(from: left.baseAddress!, count: width)
                }
            } else {
                levels[level].withUnsafeBufferPointer { target.update(from: $0.baseAddress!, count: width) }
                have = true
            }
        }
        if !have { target.update(repeating: 0, count: width) }
    }
}

extension PairwiseAccumulator where Scalar == Double {
    /// Adds the next leaf, given in Float and widened: the same bits as writing the widened leaf
    /// with ``add(_:)``, without the widened copy (the leaf goes straight into its level, or is
    /// added to the block before it on the way).
    public mutating func add(widening leaf: UnsafePointer<Float>) {
        if levels.isEmpty {
            levels.append(Scalar.filled(width, with: 0))
            occupied.append(false)
        }
        if !occupied[0] {
            levels[0].withUnsafeMutableBufferPointer { Float.widen(leaf, count: width, into: $0.baseAddress!) }
            occupied[0] = true
            count += 1
            return
        }
        // Level 0 holds the leaf before this one: left + right, into the carry.
        let n = width
        levels[0].withUnsafeBufferPointer { left in
            carry.withUnsafeMutableBufferPointer { sum in
                for i in 0..<n { sum[i] = left[i] + Double(leaf[i]) }
            }
        }
        occupied[0] = false
        carryUp(from: 1)
    }
}

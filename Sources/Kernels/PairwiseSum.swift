import Foundation

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

/// Arrays lent out and given back, shared by everything in the process that sums a tree (a lock
/// guards it, for ranks that are threads of one process). A network's backward sums one layer's
/// weight gradient at a time, so the trees of all its layers, borrowing their levels here, hold
/// the memory of the largest layer's tree between them instead of every layer's.
///
/// An array handed out has at least the count asked for and undefined contents. When no free array
/// is big enough, the free ones (all smaller) are let go and a new one is made: the pool settles
/// on what one step's largest use needs, after which lending allocates nothing.
public final class ScratchArrays<Scalar: TensorScalar>: @unchecked Sendable {
    private var free: [[Scalar]] = []
    private let lock = NSLock()
    /// Arrays made so far (none once a repeated use has settled).
    public private(set) var allocations = 0

    public init() {}

    /// An array of at least `count` values: the smallest free one that is big enough, or a new one.
    public func take(atLeast count: Int) -> [Scalar] {
        lock.lock()
        defer { lock.unlock() }
        var best: Int?
        for i in free.indices where free[i].count >= count && (best == nil || free[i].count < free[best!].count) { best = i }
        if let best {
            free.swapAt(best, free.count - 1)
            return free.removeLast()
        }
        free.removeAll()
        allocations += 1
        return Scalar.filled(count, with: 0)
    }

    /// Takes an array back for the next borrower.
    public func giveBack(_ array: inout [Scalar]) {
        guard !array.isEmpty else { return }
        var returned: [Scalar] = []
        swap(&returned, &array)
        lock.lock()
        free.append(returned)
        lock.unlock()
    }

    /// Lets the free arrays go (memory a finished job no longer needs); lent ones are not affected.
    public func releaseFree() {
        lock.lock()
        free.removeAll()
        lock.unlock()
    }

    /// Values held by the free arrays.
    public var freeCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return free.reduce(0) { $0 + $1.count }
    }
}

/// Adds leaves one at a time in the canonical pairwise order with memory for O(log n) partial
/// sums (a binary counter: level j holds the sum of the last complete block of 2^j leaves), for
/// leaves too large to keep all at once (a convolution's per-sample weight gradient).
///
/// The levels are borrowed from `Scalar.scratchArrays` at the first leaf of a sum and given back
/// when its total is taken, which ends the sum (the next leaf starts a new one): the trees of a
/// network's layers share their memory, and a layer that sums every step allocates nothing after
/// the first steps.
public struct PairwiseAccumulator<Scalar: TensorScalar> {
    public let width: Int
    /// Borrowed buffers of at least `width` values (only the first `width` are used): a level
    /// holds one while it is occupied, and a level that empties passes its buffer on to the next
    /// level that fills (`spares`), so a sum of n leaves borrows popcount-many buffers plus the
    /// carry at most (3 for 4 leaves, not one per level).
    private var levels: [[Scalar]] = []
    private var occupied: [Bool] = []
    private var spares: [[Scalar]] = []
    /// The leaf being written, and afterwards the carry travelling up the levels.
    private var carry: [Scalar] = []
    /// Leaves of the current sum, or of the last one once its total is taken.
    public private(set) var count = 0
    /// The total was taken: the buffers are back in the pool and the next leaf starts a new sum.
    private var ended = false

    public init(width: Int) {
        self.width = width
    }

    /// Forgets every leaf and gives the buffers back.
    public mutating func reset() {
        for j in levels.indices { Scalar.scratchArrays.giveBack(&levels[j]) }
        for j in spares.indices { Scalar.scratchArrays.giveBack(&spares[j]) }
        levels.removeAll(keepingCapacity: true)
        occupied.removeAll(keepingCapacity: true)
        spares.removeAll(keepingCapacity: true)
        Scalar.scratchArrays.giveBack(&carry)
        count = 0
        ended = false
    }

    private mutating func beginLeaf() {
        if ended { reset() }
        if carry.isEmpty { carry = Scalar.scratchArrays.take(atLeast: width) }
    }

    /// Adds the next leaf, which `write` puts into the buffer it is given (`width` values,
    /// contents undefined on entry).
    public mutating func add(_ write: (UnsafeMutablePointer<Scalar>) -> Void) {
        beginLeaf()
        carry.withUnsafeMutableBufferPointer { write($0.baseAddress!) }
        carryUp(from: 0)
    }

    /// Puts the carry (the newest complete block, ending with the newest leaf) at level `start`,
    /// merging it with the blocks before it on the way up; counts the leaf.
    private mutating func carryUp(from start: Int) {
        let n = width
        var level = start
        while level < occupied.count && occupied[level] {
            // levels[level] holds the block just before this one: left + right.
            levels[level].withUnsafeMutableBufferPointer { left in
                carry.withUnsafeBufferPointer { right in
                    Scalar.add(UnsafeBufferPointer(start: right.baseAddress!, count: n),
                               into: UnsafeMutableBufferPointer(start: left.baseAddress!, count: n))
                }
            }
            swap(&levels[level], &carry)
            vacate(level)
            level += 1
        }
        while level >= occupied.count {
            levels.append([])
            occupied.append(false)
        }
        if levels[level].isEmpty { levels[level] = spares.popLast() ?? Scalar.scratchArrays.take(atLeast: n) }
        swap(&levels[level], &carry)
        occupied[level] = true
        count += 1
    }

    /// Marks `level` empty and keeps its buffer for the next level that fills.
    private mutating func vacate(_ level: Int) {
        occupied[level] = false
        var buffer: [Scalar] = []
        swap(&buffer, &levels[level])
        if !buffer.isEmpty { spares.append(buffer) }
    }

    /// The total of the leaves of this sum, computed in the accumulator's own leaf buffer and
    /// handed to `body`: no buffer of the caller's. Ends the sum.
    public mutating func withTotal<R>(_ body: (UnsafePointer<Scalar>) throws -> R) rethrows -> R {
        var scratch: [Scalar] = []
        swap(&scratch, &carry)
        if scratch.isEmpty { scratch = Scalar.scratchArrays.take(atLeast: width) }
        defer { Scalar.scratchArrays.giveBack(&scratch) }
        return try scratch.withUnsafeMutableBufferPointer { t in
            total(into: t.baseAddress!)
            return try body(t.baseAddress!)
        }
    }

    /// The total of the leaves of this sum, into `target` (`width` values; zeros when there were
    /// none): the partial blocks combined from the latest (rightmost) up. Ends the sum: the
    /// buffers go back to the pool.
    public mutating func total(into target: UnsafeMutablePointer<Scalar>) {
        let n = width
        var have = false
        for level in levels.indices where occupied[level] {
            if have {
                levels[level].withUnsafeMutableBufferPointer { left in
                    Scalar.add(UnsafeBufferPointer(start: target, count: n), into: UnsafeMutableBufferPointer(start: left.baseAddress!, count: n))
                    target.update(from: left.baseAddress!, count: n)
                }
            } else {
                levels[level].withUnsafeBufferPointer { target.update(from: $0.baseAddress!, count: n) }
                have = true
            }
        }
        if !have { target.update(repeating: 0, count: n) }
        let leaves = count
        reset()
        count = leaves
        ended = true
    }
}

extension PairwiseAccumulator where Scalar == Double {
    /// Adds the next leaf, given in Float and widened: the same bits as writing the widened leaf
    /// with ``add(_:)``, without the widened copy (the leaf goes straight into its level, or is
    /// added to the block before it on the way).
    public mutating func add(widening leaf: UnsafePointer<Float>) {
        beginLeaf()
        if levels.isEmpty {
            levels.append([])
            occupied.append(false)
        }
        let n = width
        if !occupied[0] {
            if levels[0].isEmpty { levels[0] = spares.popLast() ?? Scalar.scratchArrays.take(atLeast: n) }
            levels[0].withUnsafeMutableBufferPointer { Float.widen(leaf, count: n, into: $0.baseAddress!) }
            occupied[0] = true
            count += 1
            return
        }
        // Level 0 holds the leaf before this one: left + right, into the carry.
        levels[0].withUnsafeBufferPointer { left in
            carry.withUnsafeMutableBufferPointer { sum in
                for i in 0..<n { sum[i] = left[i] + Double(leaf[i]) }
            }
        }
        vacate(0)
        carryUp(from: 1)
    }
}

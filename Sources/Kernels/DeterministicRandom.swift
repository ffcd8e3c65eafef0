import Foundation

/// A small, fast, seedable generator (xoshiro256**, seeded through SplitMix64) so that every rank
/// and every run derives the same numbers from the same seed, on any platform.
public struct DeterministicRandom: RandomNumberGenerator {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    /// A generator for `seed`, further separated by `stream` values (e.g. the epoch, a sample
    /// index, a layer number), so that independent uses never share a sequence.
    public init(seed: UInt64, stream: [UInt64] = []) {
        var x = seed &+ 0x9E37_79B9_7F4A_7C15
        for value in stream { x = DeterministicRandom.splitMix(&x) ^ (value &* 0xD1B5_4A32_D192_ED03) }
        s = (DeterministicRandom.splitMix(&x), DeterministicRandom.splitMix(&x), DeterministicRandom.splitMix(&x), DeterministicRandom.splitMix(&x))
    }

    private static func splitMix(_ x: inout UInt64) -> UInt64 {
        x &+= 0x9E37_79B9_7F4A_7C15
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3
        s.2 ^= t
        s.3 = (s.3 << 45) | (s.3 >> 19)
        return result
    }

    /// Uniform in [0, 1) with 53 random bits.
    public mutating func uniform() -> Double {
        Double(next() >> 11) * 0x1.0p-53
    }

    /// Uniform in [low, high).
    public mutating func uniform(_ low: Double, _ high: Double) -> Double {
        low + (high - low) * uniform()
    }

    /// Standard normal (Box–Muller).
    public mutating func normal() -> Double {
        let u1 = max(uniform(), 0x1.0p-60), u2 = uniform()
        return (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * Double.pi * u2)
    }

    /// Uniform integer in 0 ..< bound (unbiased).
    public mutating func integer(below bound: Int) -> Int {
        Int(next(upperBound: UInt64(bound)))
    }
}

extension Tensor {
    /// U(−bound, bound) entries: PyTorch's default init for conv and linear weights and biases
    /// uses bound = 1/√fan_in (kaiming_uniform with a = √5).
    public static func uniform(shape: [Int], bound: Double, using random: inout DeterministicRandom) -> Tensor {
        var t = Tensor(shape: shape)
        for i in 0..<t.count { t.scalars[i] = Scalar(random.uniform(-bound, bound)) }
        return t
    }

    /// N(mean, std²) entries.
    public static func normal(shape: [Int], mean: Double = 0, std: Double = 1, using random: inout DeterministicRandom) -> Tensor {
        var t = Tensor(shape: shape)
        for i in 0..<t.count { t.scalars[i] = Scalar(mean + std * random.normal()) }
        return t
    }
}

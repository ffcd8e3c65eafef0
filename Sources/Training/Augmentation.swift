import Kernels

/// Training-time augmentation of image samples (C×H×W): a random crop of the image zero-padded
/// by `padding` on every side, and a horizontal flip with probability ½ — the standard CIFAR
/// recipe (He et al. 2016 §4.2). Evaluation and PreciseBN see the samples unaugmented.
///
/// The randomness of a sample is drawn from (seed, epoch, the sample's index in the training
/// set) alone, never from the rank or the batch it lands in: a W-rank run augments every sample
/// exactly as a 1-rank run does, and a resumed run as the uninterrupted one.
public struct Augmentation: Codable, Equatable, Sendable, CustomStringConvertible {
    public var crop = false
    public var flip = false
    /// Zero-padding before the crop, in pixels (for `crop`).
    public var padding = 4

    public init(crop: Bool = false, flip: Bool = false, padding: Int = 4) {
        self.crop = crop
        self.flip = flip
        self.padding = padding
    }

    public var isIdentity: Bool { !flip && (!crop || padding == 0) }

    /// `crop,flip`, `crop`, `flip` or `none`, as `--augment` takes it.
    public var description: String {
        let parts = (crop ? ["crop"] : []) + (flip ? ["flip"] : [])
        return parts.isEmpty ? "none" : parts.joined(separator: ",")
    }

    /// Parses `--augment`'s list (`crop,flip`, `crop`, `flip`, `none`).
    public init(parsing text: String, padding: Int) throws {
        self.init(padding: padding)
        guard text != "none" else { return }
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            switch item {
            case "crop": crop = true
            case "flip": flip = true
            default: throw DataError("⟨augmentation⟩: unknown item '\(item)' (crop, flip, none or auto)")
            }
        }
    }

    /// What `--augment auto` means for a data set: crop+flip for the natural-image sets
    /// (Fashion-MNIST, CIFAR-10), nothing for the rest (synthetic, idx, npy: digits or arbitrary
    /// arrays, where a flip may change the class). Padding 2 for images of at most 28×28, else 4.
    public static func automatic(for source: DataSource, sampleShape: [Int]) -> Augmentation {
        let padding = defaultPadding(sampleShape: sampleShape)
        switch source {
        case .fashionMNIST, .cifar10: return Augmentation(crop: sampleShape.count == 3, flip: sampleShape.count == 3, padding: padding)
        case let .twoDomain(inner): return automatic(for: inner, sampleShape: sampleShape)
        case let .shiftedDomain(inner, _): return automatic(for: inner, sampleShape: sampleShape)
        default: return Augmentation(padding: padding)
        }
    }

    public static func defaultPadding(sampleShape: [Int]) -> Int {
        sampleShape.count == 3 && max(sampleShape[1], sampleShape[2]) <= 28 ? 2 : 4
    }

    /// The crop offsets (0 … 2·padding, in the padded image) and flip of one sample.
    public func draw(seed: UInt64, epoch: Int, index: Int) -> (top: Int, left: Int, flip: Bool) {
        var random = DeterministicRandom(seed: seed, stream: [0x4155_474D, UInt64(epoch), UInt64(index)])
        let span = 2 * padding + 1
        let top = crop ? random.integer(below: span) : padding
        let left = crop ? random.integer(below: span) : padding
        let flipped = flip && random.next() >> 63 == 1
        return (top, left, flipped)
    }

    /// Augments one C×H×W sample from `source` into `target`; `fill[c]` is the value a zero pixel
    /// of channel c has after standardization.
    func apply(_ source: UnsafeBufferPointer<Float>, into target: UnsafeMutableBufferPointer<Float>,
               shape: [Int], fill: [Float], draw: (top: Int, left: Int, flip: Bool)) {
        let channels = shape[0], height = shape[1], width = shape[2]
        let dy = draw.top - padding, dx = draw.left - padding
        for c in 0..<channels {
            let plane = c * height * width
            for h in 0..<height {
                let sh = h + dy
                let row = plane + h * width
                guard sh >= 0 && sh < height else {
                    for w in 0..<width { target[row + w] = fill[c] }
                    continue
                }
                for w in 0..<width {
                    let sw = (draw.flip ? width - 1 - w : w) + dx
                    target[row + w] = sw >= 0 && sw < width ? source[plane + sh * width + sw] : fill[c]
                }
            }
        }
    }
}

extension Dataset {
    /// The samples at `indices` (indices into this set) with `augmentation` applied to each,
    /// keyed by (seed, epoch, index), and their labels.
    public func batch<C: Collection>(_ indices: C, augmentation: Augmentation, seed: UInt64, epoch: Int) -> (Tensor<Float>, [Int32])
    where C.Element == Int {
        guard !augmentation.isIdentity, sampleShape.count == 3 else { return batch(indices) }
        let size = sampleSize
        var scalars = [Float](repeating: 0, count: indices.count * size)
        var batchLabels = [Int32]()
        batchLabels.reserveCapacity(indices.count)
        let fill = paddingValues
        samples.withUnsafeBufferPointer { source in
            scalars.withUnsafeMutableBufferPointer { target in
                for (row, index) in indices.enumerated() {
                    augmentation.apply(UnsafeBufferPointer(rebasing: source[(index * size)..<((index + 1) * size)]),
                                       into: UnsafeMutableBufferPointer(rebasing: target[(row * size)..<((row + 1) * size)]),
                                       shape: sampleShape, fill: fill, draw: augmentation.draw(seed: seed, epoch: epoch, index: index))
                    batchLabels.append(labels[index])
                }
            }
        }
        return (Tensor(shape: [indices.count] + sampleShape, scalars: scalars), batchLabels)
    }
}

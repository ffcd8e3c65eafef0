import Foundation
import Kernels

/// Labelled samples held in memory: `count` samples of `sampleShape` (C×H×W, or F for feature
/// vectors), Float32, with integer labels in 0 ..< classes.
public struct Dataset: Sendable {
    public let sampleShape: [Int]
    public let classes: Int
    public private(set) var samples: [Float]
    public let labels: [Int32]
    /// Per channel, the value a zero input (a black pixel) has after ``standardize(mean:std:)``:
    /// what augmentation pads with, as torchvision pads before normalizing.
    public private(set) var paddingValues: [Float] = []
    /// A domain label per sample (0 ..< domainCount) for data that mixes domains (two-domain:SRC,
    /// npy:X,Y,D); nil for one domain.
    public var domains: [Int32]?
    /// The number of domains (1 without domain labels).
    public var domainCount: Int { Int(domains?.max() ?? 0) + 1 }

    public var count: Int { labels.count }
    public var sampleSize: Int { sampleShape.reduce(1, *) }

    public init(sampleShape: [Int], classes: Int, samples: [Float], labels: [Int32]) {
        precondition(samples.count == labels.count * sampleShape.reduce(1, *), "samples and labels disagree")
        self.sampleShape = sampleShape
        self.classes = classes
        self.samples = samples
        self.labels = labels
        self.paddingValues = [Float](repeating: 0, count: sampleShape.count == 3 ? sampleShape[0] : 1)
    }

    /// The samples at `indices` as one N×… tensor, with their labels.
    public func batch<C: Collection>(_ indices: C) -> (Tensor<Float>, [Int32]) where C.Element == Int {
        let size = sampleSize
        var scalars = [Float](repeating: 0, count: indices.count * size)
        var batchLabels = [Int32]()
        batchLabels.reserveCapacity(indices.count)
        samples.withUnsafeBufferPointer { source in
            scalars.withUnsafeMutableBufferPointer { target in
                for (row, index) in indices.enumerated() {
                    _ = UnsafeMutableBufferPointer(rebasing: target[(row * size)..<((row + 1) * size)])
                        .initialize(from: source[(index * size)..<((index + 1) * size)])
                    batchLabels.append(labels[index])
                }
            }
        }
        return (Tensor(shape: [indices.count] + sampleShape, scalars: scalars), batchLabels)
    }

    /// Samples `range` as a new data set.
    public func subset(_ range: Range<Int>) -> Dataset {
        var part = Dataset(sampleShape: sampleShape, classes: classes,
                           samples: Array(samples[(range.lowerBound * sampleSize)..<(range.upperBound * sampleSize)]),
                           labels: Array(labels[range]))
        part.paddingValues = paddingValues
        part.domains = domains.map { Array($0[range]) }
        return part
    }

    /// The samples of domain `domain`, in their order, as a new data set (its domain labels kept).
    public func subset(domain: Int32) -> Dataset {
        guard let all = domains else { return self }
        let indices = all.indices.filter { all[$0] == domain }
        let (x, y) = batch(indices)
        var part = Dataset(sampleShape: sampleShape, classes: classes, samples: x.scalars, labels: y)
        part.paddingValues = paddingValues
        part.domains = indices.map { all[$0] }
        return part
    }

    /// The domain labels of the samples at `indices` (nil without domains).
    public func domains<C: Collection>(of indices: C) -> [Int32]? where C.Element == Int {
        domains.map { all in indices.map { all[$0] } }
    }

    /// This data set followed, sample by sample, by an intensity-inverted copy as domain 1:
    /// sample i becomes samples 2i (domain 0) and 2i + 1 (x' = lo + hi − x, lo and hi the data's
    /// extremes; 1 − x for pixels in [0, 1]) — interleaved, so that any contiguous part holds both.
    public func withInvertedDomain() -> Dataset {
        let lo = samples.min() ?? 0, hi = samples.max() ?? 0, size = sampleSize
        var values = [Float](repeating: 0, count: 2 * samples.count)
        var doubled = [Int32](repeating: 0, count: 2 * count)
        for i in 0..<count {
            for k in 0..<size {
                let v = samples[i * size + k]
                values[2 * i * size + k] = v
                values[(2 * i + 1) * size + k] = lo + hi - v
            }
            doubled[2 * i] = labels[i]
            doubled[2 * i + 1] = labels[i]
        }
        var result = Dataset(sampleShape: sampleShape, classes: classes, samples: values, labels: doubled)
        result.domains = (0..<(2 * count)).map { Int32($0 % 2) }
        return result
    }

    /// Every sample twice, in place (2i) and changed by `shift` as domain 1 (2i + 1), both with
    /// the sample's label. Images only (C×H×W).
    public func withSecondDomain(_ shift: DomainShift) throws -> Dataset {
        guard sampleShape.count == 3 else { throw DataError("two-domain-\(shift.rawValue): needs C×H×W images, the samples have shape \(sampleShape)") }
        let (channels, height, width) = (sampleShape[0], sampleShape[1], sampleShape[2])
        let background = samples.min() ?? 0, size = sampleSize, plane = height * width
        var values = [Float](repeating: 0, count: 2 * samples.count)
        var doubled = [Int32](repeating: 0, count: 2 * count)
        for i in 0..<count {
            let source = i * size, original = 2 * i * size, changed = (2 * i + 1) * size
            for k in 0..<size { values[original + k] = samples[source + k] }
            switch shift {
            case .shrunk:
                // Half the size (each 2×2 block averaged), centred on the background.
                let (h2, w2) = (height / 2, width / 2), (top, left) = ((height - height / 2) / 2, (width - width / 2) / 2)
                for k in 0..<size { values[changed + k] = background }
                for c in 0..<channels {
                    for y in 0..<h2 {
                        for x in 0..<w2 {
                            var sum: Float = 0
                            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] { sum += samples[source + c * plane + (2 * y + dy) * width + 2 * x + dx] }
                            values[changed + c * plane + (top + y) * width + left + x] = sum / 4
                        }
                    }
                }
            case .contrast:
                // A third of the contrast: each channel's deviations from its mean over the image.
                for c in 0..<channels {
                    var mean: Float = 0
                    for k in 0..<plane { mean += samples[source + c * plane + k] }
                    mean /= Float(plane)
                    for k in 0..<plane { values[changed + c * plane + k] = mean + (samples[source + c * plane + k] - mean) / 3 }
                }
            }
            doubled[2 * i] = labels[i]
            doubled[2 * i + 1] = labels[i]
        }
        var result = Dataset(sampleShape: sampleShape, classes: classes, samples: values, labels: doubled)
        result.domains = (0..<(2 * count)).map { Int32($0 % 2) }
        return result
    }

    /// Per-channel mean and standard deviation (channel = first sample dimension for C×H×W,
    /// one channel for feature vectors), in Double.
    public func channelMoments() -> (mean: [Double], std: [Double]) {
        let channels = sampleShape.count == 3 ? sampleShape[0] : 1
        let perChannel = sampleSize / channels
        var sum = [Double](repeating: 0, count: channels), squares = sum
        for n in 0..<count {
            for c in 0..<channels {
                let base = n * sampleSize + c * perChannel
                for p in 0..<perChannel {
                    let v = Double(samples[base + p])
                    sum[c] += v
                    squares[c] += v * v
                }
            }
        }
        let m = Double(max(count * perChannel, 1))
        let mean = sum.map { $0 / m }
        let std = zip(squares, mean).map { max($0 / m - $1 * $1, 0).squareRoot() }
        return (mean, std)
    }

    /// (x − mean_c)/std_c per channel (std 0 is left unscaled).
    public mutating func standardize(mean: [Double], std: [Double]) {
        let channels = mean.count, perChannel = sampleSize / channels
        paddingValues = (0..<channels).map { c in Float((Double(paddingValues[c]) - mean[c]) / (std[c] > 0 ? std[c] : 1)) }
        for n in 0..<count {
            for c in 0..<channels {
                let base = n * sampleSize + c * perChannel
                let s = std[c] > 0 ? std[c] : 1
                for p in 0..<perChannel { samples[base + p] = Float((Double(samples[base + p]) - mean[c]) / s) }
            }
        }
    }
}

/// A training set and the held-out set that evaluation uses.
public struct DataSplit: Sendable {
    public var train: Dataset
    public var heldOut: Dataset

    public init(train: Dataset, heldOut: Dataset) {
        self.train = train
        self.heldOut = heldOut
    }

    /// How many held-out samples also appear, bit for bit, in the training set (an evaluation on
    /// them would not be held out).
    public func overlap() -> Int {
        func hash(_ data: Dataset, _ index: Int) -> UInt64 {
            var h: UInt64 = 0xCBF2_9CE4_8422_2325
            for value in data.samples[(index * data.sampleSize)..<((index + 1) * data.sampleSize)] {
                h = (h ^ UInt64(value.bitPattern)) &* 0x100_0000_01B3
            }
            return h
        }
        let training = Set((0..<train.count).map { hash(train, $0) })
        return (0..<heldOut.count).filter { training.contains(hash(heldOut, $0)) }.count
    }

    /// Standardizes both sets with the training set's per-channel moments, so that every source
    /// (bytes in 0…255, arbitrary floats) enters the network on the same scale.
    public mutating func standardize() {
        let (mean, std) = train.channelMoments()
        train.standardize(mean: mean, std: std)
        heldOut.standardize(mean: mean, std: std)
        inputMean = mean
        inputStd = std.map { $0 > 0 ? $0 : 1 }
    }

    /// The per-channel mean and standard deviation the inputs were standardized with (of the
    /// training split, in the source's units: pixels / 255 for images): x_model = (x − mean)/std.
    public private(set) var inputMean: [Double] = []
    public private(set) var inputStd: [Double] = []
}

/// How the second domain of `two-domain-KIND:SOURCE` differs from the source.
public enum DomainShift: String, Codable, Sendable, CaseIterable {
    /// Each image at half its size (2×2 means), centred on the background: a change of scale,
    /// which per-domain statistics cannot undo.
    case shrunk
    /// Each image at a third of its contrast (per channel, around the image's mean): an affine
    /// change of intensity, which per-domain statistics of the first normalization undo.
    case contrast
}

import Foundation
import Kernels

/// The built-in data set: 10 classes of 3×16×16 colour images generated from a seed, so that
/// `syncbn-train` runs with no files at all.
///
/// Each class has a prototype made of three coloured Gaussian blobs and an oriented colour
/// grating. A sample is its class prototype shifted by up to ±3 pixels (circularly), scaled in
/// contrast by U(0.6, 1.4), offset per channel by N(0, 0.5²) and covered with N(0, 1) pixel noise.
/// Sample i depends only on (seed, i), so every rank generates identical data.
public enum SyntheticImages {
    public static let classes = 10
    public static let sampleShape = [3, 16, 16]

    public static func make(trainCount: Int, heldOutCount: Int, seed: UInt64) -> DataSplit {
        let prototypes = (0..<classes).map { prototype(class: $0, seed: seed) }
        func generate(_ range: Range<Int>) -> Dataset {
            let size = sampleShape.reduce(1, *)
            var samples = [Float](repeating: 0, count: range.count * size)
            var labels = [Int32](repeating: 0, count: range.count)
            for (row, index) in range.enumerated() {
                var random = DeterministicRandom(seed: seed, stream: [0x5341_4D50, UInt64(index)])
                let label = random.integer(below: classes)
                labels[row] = Int32(label)
                let dx = random.integer(below: 7) - 3, dy = random.integer(below: 7) - 3
                let contrast = random.uniform(0.6, 1.4)
                let offsets = (0..<3).map { _ in 0.5 * random.normal() }
                let proto = prototypes[label]
                for c in 0..<3 {
                    for y in 0..<16 {
                        for x in 0..<16 {
                            let sy = (y + dy + 16) % 16, sx = (x + dx + 16) % 16
                            let value = contrast * proto[(c * 16 + sy) * 16 + sx] + offsets[c] + random.normal()
                            samples[row * size + (c * 16 + y) * 16 + x] = Float(value)
                        }
                    }
                }
            }
            return Dataset(sampleShape: sampleShape, classes: classes, samples: samples, labels: labels)
        }
        return DataSplit(train: generate(0..<trainCount), heldOut: generate(trainCount..<(trainCount + heldOutCount)))
    }

    static func prototype(class label: Int, seed: UInt64) -> [Double] {
        var random = DeterministicRandom(seed: seed, stream: [0x5052_4F54, UInt64(label)])
        var image = [Double](repeating: 0, count: 3 * 16 * 16)
        for _ in 0..<3 {
            let cx = random.uniform(2, 14), cy = random.uniform(2, 14), sigma = random.uniform(1.5, 3.5)
            let colour = (0..<3).map { _ in 1.5 * random.normal() }
            for y in 0..<16 {
                for x in 0..<16 {
                    let r2 = (Double(x) - cx) * (Double(x) - cx) + (Double(y) - cy) * (Double(y) - cy)
                    let weight = exp(-r2 / (2 * sigma * sigma))
                    for c in 0..<3 { image[(c * 16 + y) * 16 + x] += colour[c] * weight }
                }
            }
        }
        let angle = random.uniform(0, Double.pi), frequency = random.uniform(0.4, 1.2), phase = random.uniform(0, 2 * Double.pi)
        let amplitude = (0..<3).map { _ in 0.6 * random.normal() }
        for y in 0..<16 {
            for x in 0..<16 {
                let wave = sin(frequency * (cos(angle) * Double(x) + sin(angle) * Double(y)) + phase)
                for c in 0..<3 { image[(c * 16 + y) * 16 + x] += amplitude[c] * wave }
            }
        }
        return image
    }
}

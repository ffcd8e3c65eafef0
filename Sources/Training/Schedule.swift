import Foundation

/// The shape of the learning rate over a run (after warm-up).
public enum LearningRateSchedule: String, Codable, CaseIterable, Sendable {
    /// The peak rate throughout.
    case constant
    /// The peak rate, ×0.1 at each of `--lr-milestones` (epochs).
    case step
    /// Half a cosine from the peak rate at the end of warm-up to 0 at the end of the run
    /// (Loshchilov & Hutter 2017, without restarts), evaluated every step.
    case cosine
}

/// How the trainer sets the learning rate of every step. A pure function of the step, so that a
/// resumed run continues on the same curve.
public struct LearningRatePlan: Equatable, Sendable {
    /// `--lr` × total batch / `--lr-reference-batch` (the linear scaling rule, Goyal et al. 2017).
    public let peak: Double
    public let schedule: LearningRateSchedule
    /// Milestones in steps (for `.step`).
    public let milestoneSteps: [Int]
    public let warmupSteps: Int
    public let totalSteps: Int

    public init(peak: Double, schedule: LearningRateSchedule, milestoneSteps: [Int], warmupSteps: Int, totalSteps: Int) {
        self.peak = peak
        self.schedule = schedule
        self.milestoneSteps = milestoneSteps.sorted()
        self.warmupSteps = max(warmupSteps, 0)
        self.totalSteps = max(totalSteps, 1)
    }

    /// The rate of optimizer step `step` (counted from 0). Warm-up rises linearly,
    /// peak·(step + 1)/warmup, so its last step reaches the peak; the schedule takes over after.
    public func rate(at step: Int) -> Double {
        if step < warmupSteps { return peak * Double(step + 1) / Double(warmupSteps) }
        switch schedule {
        case .constant:
            return peak
        case .step:
            return peak * pow(0.1, Double(milestoneSteps.filter { step >= $0 }.count))
        case .cosine:
            let span = max(totalSteps - warmupSteps, 1)
            let t = Double(step - warmupSteps) / Double(span)
            return peak * 0.5 * (1 + cos(Double.pi * min(t, 1)))
        }
    }
}

extension TrainingConfiguration {
    /// The learning-rate plan of a run on `ranks` ranks with `stepsPerEpoch` and `totalSteps`.
    /// Default warm-up: one epoch, but at most a tenth of the run.
    public func learningRatePlan(ranks: Int, stepsPerEpoch: Int, totalSteps: Int) -> LearningRatePlan {
        let totalBatch = Double(batchSize * ranks)
        let peak = learningRate * (lrReferenceBatch.map { totalBatch / Double($0) } ?? 1)
        let warmup: Int
        if let warmupSteps {
            warmup = warmupSteps
        } else if let warmupEpochs {
            warmup = Int((warmupEpochs * Double(stepsPerEpoch)).rounded())
        } else {
            warmup = min(stepsPerEpoch, totalSteps / 10)
        }
        let milestones = lrMilestones.map { Int(($0 * Double(stepsPerEpoch)).rounded()) }
        return LearningRatePlan(peak: peak, schedule: lrSchedule, milestoneSteps: milestones, warmupSteps: warmup,
                                totalSteps: totalSteps)
    }
}

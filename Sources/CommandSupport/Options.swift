import ArgumentParser
import Kernels
import Normalization
import Training

// The library's choices are the command line's: each enum parses its own raw values, lists them
// in --help, and a value outside them is ArgumentParser's one-line error naming the flag.
// The long lists (norms, models) are named in their options' help instead of ArgumentParser's
// bulleted list, so that a bad value is one error line (followed by that help line).
extension NormalizationKind: ExpressibleByArgument {
    public static var allValueStrings: [String] { [] }
}
extension ModelKind: ExpressibleByArgument {
    public static var allValueStrings: [String] { [] }
}
extension SamplerKind: ExpressibleByArgument {}
extension CrossIterationGradient: ExpressibleByArgument {}
extension EvaluationStatistics: ExpressibleByArgument {}
extension LearningRateSchedule: ExpressibleByArgument {}
extension ConvolutionBackend: ExpressibleByArgument {}

extension TrainingConfiguration {
    /// The configuration's own check (``problem()``), as the command line's usage error: the
    /// ranges are written once, in the library, and name the flags.
    public func validateAsOptions() throws {
        if let problem = problem() { throw ValidationError(problem) }
    }
}

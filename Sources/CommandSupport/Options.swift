import ArgumentParser
import Foundation
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
extension PreciseBNDomains: ExpressibleByArgument {}
extension LearningRateSchedule: ExpressibleByArgument {}
extension ConvolutionBackend: ExpressibleByArgument {}
extension ConvolutionBackendSetting: ExpressibleByArgument {
    public init?(argument: String) { self.init(argument) }
    public static var allValueStrings: [String] { [] }
}

extension ConvolutionBackendSetting {
    /// `--conv-backend`'s default: SYNCBN_CONV_BACKEND when set (a site's or a test suite's pin), else auto.
    public static func commandLineDefault() throws -> ConvolutionBackendSetting {
        guard let text = ProcessInfo.processInfo.environment["SYNCBN_CONV_BACKEND"], !text.isEmpty else { return .auto }
        guard let value = ConvolutionBackendSetting(text) else {
            throw ValidationError("SYNCBN_CONV_BACKEND='\(text)' is not auto, im2col, onednn or a comma-separated list of im2col/onednn")
        }
        return value
    }
}

extension TrainingConfiguration {
    /// The configuration's own check (``problem()``), as the command line's usage error: the
    /// ranges are written once, in the library, and name the flags.
    public func validateAsOptions() throws {
        if let problem = problem() { throw ValidationError(problem) }
    }
}

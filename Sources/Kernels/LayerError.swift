/// An error a user can cause through a layer: an input of the wrong shape, a batch too small
/// for batch statistics, a value that is not finite. The message names the layer and the fix.
public struct LayerError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

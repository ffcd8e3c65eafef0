/// An error a user can cause through a layer: an input of the wrong shape, a batch too small
/// for batch statistics, a value that is not finite. The message names the layer and the fix.
public struct LayerError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { SettingNames.render(message) }
}

/// Error text names a run's settings as ⟨field⟩ (`⟨batchSize⟩`, `⟨crossIteration.window⟩`, the
/// fields of the training configuration), so that one message serves two audiences: the library
/// shows the field names, and a command line that sets ``commandLine`` shows its flags instead
/// (`--batch-size`).
public enum SettingNames {
    /// How the running command line names a setting; nil (the default): by its field name.
    nonisolated(unsafe) public static var commandLine: ((String) -> String)?

    /// `text` with every ⟨field⟩ replaced by its name for the current audience.
    public static func render(_ text: String) -> String {
        guard text.contains("⟨") else { return text }
        var out = "", rest = Substring(text)
        while let open = rest.firstIndex(of: "⟨"), let close = rest[open...].firstIndex(of: "⟩") {
            out += rest[..<open]
            let field = String(rest[rest.index(after: open)..<close])
            out += commandLine?(field) ?? field
            rest = rest[rest.index(after: close)...]
        }
        return out + rest
    }
}

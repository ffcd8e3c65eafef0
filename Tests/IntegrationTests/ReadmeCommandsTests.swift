import Foundation
import TestSupport
import XCTest

/// Every command in the README's (and docs/performance.md's) `sh` blocks runs, in a small form:
/// training commands get `--steps 3`, benchmarks a few repetitions, and `mpirun` the flags this
/// machine needs (`--allow-run-as-root` as root). So the documentation cannot rot.
final class ReadmeCommandsTests: XCTestCase {
    var root: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }

    /// The commands of every ```sh block: continuation lines joined, `&&` chains split, trailing
    /// comments (two spaces and #) dropped.
    func commands(in file: String) throws -> [String] {
        let text = try String(contentsOfFile: root + "/" + file, encoding: .utf8)
        var commands: [String] = [], inBlock = false, pending = ""
        for line in text.components(separatedBy: "\n") {
            if line.hasPrefix("```") { inBlock = line == "```sh"; continue }
            guard inBlock else { continue }
            var body = line
            if let comment = body.range(of: "  #") { body = String(body[..<comment.lowerBound]) }
            body = body.trimmingCharacters(in: .whitespaces)
            if body.hasSuffix("\\") { pending += body.dropLast() + " "; continue }
            let full = (pending + body).trimmingCharacters(in: .whitespaces)
            pending = ""
            if !full.isEmpty { commands += full.components(separatedBy: " && ").map { $0.trimmingCharacters(in: .whitespaces) } }
        }
        return commands
    }

    func smallForm(_ command: String) -> String? {
        if command.hasPrefix("./launch/setup") || command.hasPrefix("./launch/test") { return nil }   // this run is their proof
        var c = command.replacingOccurrences(of: "./launch/", with: root + "/launch/")
            .replacingOccurrences(of: ".build/release/", with: root + "/.build/release/")
        if c.hasPrefix("mpirun ") && getuid() == 0 { c = "mpirun --allow-run-as-root " + c.dropFirst("mpirun ".count) }
        if c.contains("syncbn-train") || c.contains("launch/train") { c += " --steps 3 --precise-bn-samples 256" }
        if c.contains("syncbn-bench") {
            if c.contains(" train") { c += " --steps 2 --warmup 1" }
            if c.contains(" allreduce") { c += " --repeats 2" }
        }
        return c
    }

    func testEveryDocumentedShellCommandRuns() throws {
        var ran = 0
        for file in ["README.md", "docs/performance.md"] {
            let dir = temporaryDirectory("syncbn-readme")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            for command in try commands(in: file) {
                guard let small = smallForm(command) else { continue }
                let result = try runProcess("/bin/sh", ["-c", small], environment: ["OPENBLAS_NUM_THREADS": "1"], timeout: 300, directory: dir)
                XCTAssertEqual(result.status, 0, "\(file): `\(command)` as `\(small)`: \(result.stderr.suffix(1500))")
                XCTAssertFalse(command.contains("…"), "\(file): `\(command)` cannot be pasted")
                ran += 1
            }
        }
        XCTAssertGreaterThanOrEqual(ran, 9, "the documented commands were found")
    }
}

/// `syncbn-train train --help` and the README's option table list the same flags.
final class HelpAndReadmeAgreeTests: XCTestCase {
    func testEveryFlagOfTheHelpIsInTheReadmeTableAndBack() throws {
        let help = try runProcess(Harness.train, ["train", "--help"], timeout: 30)
        XCTAssertEqual(help.status, 0)
        func flags(_ text: String, linePrefix: String) -> Set<String> {
            let regex = try! NSRegularExpression(pattern: "--[a-z0-9-]+")
            var found = Set<String>()
            for line in text.components(separatedBy: "\n") where line.hasPrefix(linePrefix) {
                let head = linePrefix == "| " ? String(line.split(separator: "|").first ?? "") : String(line.trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "")
                for match in regex.matches(in: head, range: NSRange(head.startIndex..., in: head)) { found.insert(String(head[Range(match.range, in: head)!])) }
            }
            return found
        }
        let helpFlags = flags(help.stdout + help.stderr, linePrefix: "  --").subtracting(["--help", "--version"])
        let readme = try String(contentsOfFile: URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("README.md").path, encoding: .utf8)
        let table = readme.components(separatedBy: "## `syncbn-train`")[1].components(separatedBy: "\n## ")[0]
        let readmeFlags = flags(table, linePrefix: "| ")
        XCTAssertGreaterThan(helpFlags.count, 30)
        XCTAssertEqual(helpFlags.subtracting(readmeFlags).sorted(), [], "in --help but not in the README table")
        XCTAssertEqual(readmeFlags.subtracting(helpFlags).sorted(), [], "in the README table but not in --help")
    }
}

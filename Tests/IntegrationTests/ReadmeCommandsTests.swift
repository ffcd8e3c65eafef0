import Foundation
import TestSupport
import XCTest

/// Every command in the README's (and docs/performance.md's) `sh` blocks runs, in a small form:
/// training commands get `--steps 3`, benchmarks a few repetitions, and `mpirun` the flags this
/// machine needs (`--allow-run-as-root` as root). So the documentation cannot rot.
final class ReadmeCommandsTests: XCTestCase {
    var root: String { Harness.repositoryRoot }

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
            .replacingOccurrences(of: "python3 tools/", with: "python3 " + root + "/tools/")
            .replacingOccurrences(of: " docs/performance/", with: " " + root + "/docs/performance/")
        if c.hasPrefix("mpirun ") && getuid() == 0 { c = "mpirun --allow-run-as-root " + c.dropFirst("mpirun ".count) }
        if c.contains("syncbn-train") || c.contains("launch/train") { c += " --steps 3 --precise-bn-samples 256" }
        // One experiment of the quick study: StudyTests runs all of them.
        if c.contains("syncbn-study") && !c.contains("--list") { c += " --quick leakage" }
        if c.contains("syncbn-bench") {
            if c.contains(" train") { c += " --steps 2 --warmup 1" }
            if c.contains(" allreduce") { c += " --repeats 2" }
            if c.contains(" conv") { c += " --repeat 2" }
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

    /// The headline figures (the main job's accuracies and step count) are what the main job
    /// gives now. Not to the bit: the accuracies depend on the CPU's BLAS kernels and on the
    /// convolution backends auto picks, so each must be within 0.3 points (6 of the 2048 held-out
    /// images) — a figure left from an older version of the job fails, another CPU does not.
    func testTheHeadlineFiguresAreTheMainJobsOwn() throws {
        let readme = try String(contentsOfFile: root + "/README.md", encoding: .utf8).replacingOccurrences(of: "\n", with: " ")
        let pattern = try NSRegularExpression(pattern: #"\*\*([0-9.]+) % held-out accuracy with the EMA statistics and ([0-9.]+) % with PreciseBN's after ([0-9]+) steps"#)
        guard let match = pattern.firstMatch(in: readme, range: NSRange(readme.startIndex..., in: readme)) else {
            return XCTFail("the README's headline sentence was not found")
        }
        let quoted = (1...3).map { Double(readme[Range(match.range(at: $0), in: readme)!])! }
        let result = try runProcess("/bin/sh", ["-c", root + "/launch/train -n 4"], environment: ["OPENBLAS_NUM_THREADS": "1"], timeout: 300,
                                    directory: temporaryDirectory("syncbn-headline"))
        XCTAssertEqual(result.status, 0, describe(result))
        let done = try NSRegularExpression(pattern: #"done: held-out accuracy ([0-9.]+)% \(EMA\), ([0-9.]+)% \(PreciseBN\) after ([0-9]+) steps on 4 rank"#)
        guard let line = done.firstMatch(in: result.stderr, range: NSRange(result.stderr.startIndex..., in: result.stderr)) else {
            return XCTFail("no summary line: \(describe(result))")
        }
        let measured = (1...3).map { Double(result.stderr[Range(line.range(at: $0), in: result.stderr)!])! }
        XCTAssertEqual(measured[2], quoted[2], "steps")
        XCTAssertEqual(measured[0], quoted[0], accuracy: 0.3, "EMA accuracy: the README says \(quoted[0]) %")
        XCTAssertEqual(measured[1], quoted[1], accuracy: 0.3, "PreciseBN accuracy: the README says \(quoted[1]) %")
    }
}

/// The README's option tables are `tools/options_table.py`'s output for the current binaries —
/// the help text itself, flag by flag, default by default, word by word — and the help wraps
/// cleanly (no hard line breaks inside a paragraph).
final class HelpAndReadmeAgreeTests: XCTestCase {
    var root: String { Harness.repositoryRoot }

    func testTheReadmeOptionTablesAreTheHelpText() throws {
        let readme = try String(contentsOfFile: root + "/README.md", encoding: .utf8)
        let commands = [["syncbn-train", "train"], ["syncbn-study"]]
        for command in commands {
            let marker = "<!-- options: \(command.joined(separator: " ")) -->\n"
            guard let start = readme.range(of: marker), let end = readme.range(of: "<!-- options end -->", range: start.upperBound..<readme.endIndex) else {
                return XCTFail("README has no \(marker) block")
            }
            let documented = String(readme[start.upperBound..<end.lowerBound]).trimmingCharacters(in: .whitespacesAndNewlines)
            let generated = try runProcess("/usr/bin/env", ["python3", root + "/tools/options_table.py", productsDirectory + "/" + command[0]] + command.dropFirst(),
                                           timeout: 60)
            XCTAssertEqual(generated.status, 0, describe(generated))
            let expected = generated.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            XCTAssertGreaterThan(expected.components(separatedBy: "\n").count, 10)
            if documented != expected {
                let a = documented.components(separatedBy: "\n"), b = expected.components(separatedBy: "\n")
                let first = zip(a, b).first { $0 != $1 }
                XCTFail("README table for \(command.joined(separator: " ")) is stale (regenerate with tools/options_table.py): README has '\(first?.0 ?? "\(a.count) lines")', --help says '\(first?.1 ?? "\(b.count) lines")'")
            }
        }
    }

    func testHelpParagraphsWrapCleanly() throws {
        let subcommands: [(String, [String])] = [
            (Harness.train, ["train"]), (Harness.train, ["evaluate"]), (Harness.train, ["recompute-stats"]),
            (Harness.train, ["export-folded"]), (Harness.train, ["export-torch"]), (Harness.train, []),
            (Harness.bench, []), (Harness.bench, ["layer"]), (Harness.bench, ["train"]), (productsDirectory + "/syncbn-study", []),
        ]
        for (binary, arguments) in subcommands {
            let help = try runProcess(binary, arguments + ["--help"], timeout: 30)
            XCTAssertEqual(help.status, 0, describe(help))
            // The overview and discussion: the text before USAGE, in paragraphs. A line that ends
            // far short of the 80-column wrap while its paragraph goes on is a hard line break.
            let head = help.stdout.components(separatedBy: "USAGE:")[0]
            for paragraph in head.components(separatedBy: "\n\n") {
                let lines = paragraph.components(separatedBy: "\n").filter { !$0.isEmpty }
                for (index, line) in lines.enumerated().dropLast() {
                    let next = lines[index + 1].split(separator: " ").first.map(String.init) ?? ""
                    XCTAssertGreaterThan(line.count + 1 + next.count, 79,
                                         "\(arguments.joined(separator: " ")) --help breaks a line early: '\(line)'")
                }
            }
        }
    }
}

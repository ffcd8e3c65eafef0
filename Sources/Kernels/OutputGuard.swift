import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A file's identity: its device and inode (`stat`, every symbolic link followed), so that two
/// spellings of one file — through a symbolic link to a directory, `..`, a hard link — compare
/// equal where their path strings do not.
public struct FileIdentity: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64

    /// nil when `path` does not exist.
    public init?(_ path: String) {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
    }
}

/// The one check every command and tool makes before it writes a file, before any work: the
/// directory exists and is writable, the path is new or a regular file (not a device, a
/// directory, a symbolic link or a FIFO), and it is none of the run's inputs — compared by device
/// and inode, not by name. Errors name the flag and the path.
public enum OutputGuard {
    public static func check(_ path: String, flag: String, inputs: [String]) throws {
        guard !path.isEmpty else { throw LayerError("\(flag) needs a file name, got an empty one") }
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw LayerError("\(flag) \(path): directory \(directory) does not exist")
        }
        guard access(directory, W_OK) == 0 else { throw LayerError("\(flag) \(path): directory \(directory) is not writable") }
        do { try checkReplaceableOutput(path) } catch let error as FileFormatError { throw LayerError("\(flag) \(error)") }
        guard let target = FileIdentity(path) else { return }   // a new file: it cannot be an input
        for input in inputs where FileIdentity(input) == target {
            throw LayerError("\(flag) \(path) is one of this run's inputs (\(input)); refusing to overwrite it")
        }
    }

    /// Checks several outputs, and that no two of them are one file.
    public static func check(_ outputs: [(flag: String, path: String?)], inputs: [String]) throws {
        for case let (flag, path?) in outputs { try check(path, flag: flag, inputs: inputs) }
        try requireDistinct(outputs)
    }

    /// No two of `outputs` are one file (after resolving symbolic links).
    public static func requireDistinct(_ outputs: [(flag: String, path: String?)]) throws {
        var seen: [(flag: String, resolved: String)] = []
        for case let (flag, path?) in outputs {
            let resolved = URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path
            if let other = seen.first(where: { $0.resolved == resolved }) {
                throw LayerError("\(other.flag) and \(flag) name the same file \(path)")
            }
            seen.append((flag, resolved))
        }
    }
}

/// An exclusive advisory lock (`flock`) that makes one process the only writer of an output for
/// as long as it lives: `.NAME.lock` beside a file, or `.lock` inside a directory. The holder's
/// PID is written into the lock file, so a second writer is told who holds it. The lock ends with
/// the process, however it ends (the kernel releases it), so a killed job never leaves a stale one.
public final class WriterLock {
    public let path: String
    private let descriptor: Int32

    /// Takes the lock for writing `output` (a directory when `directory`), or throws naming the
    /// holder.
    public init(for output: String, directory: Bool = false, flag: String) throws {
        let url = URL(fileURLWithPath: output)
        path = directory ? url.appendingPathComponent(".lock").path
                         : url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).lock").path
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { throw LayerError("\(flag) \(output): cannot create the lock \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            var buffer = [UInt8](repeating: 0, count: 32)
            let n = pread(fd, &buffer, buffer.count, 0)
            close(fd)
            let holder = n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : "unknown"
            throw LayerError("\(flag) \(output) is being written by another job (PID \(holder)); one writer per output")
        }
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pwrite(fd, pid, pid.count, 0)
        descriptor = fd
    }

    deinit { close(descriptor) }
}

/// Whether a process with this PID exists (signal 0: permission errors still mean it exists).
public func processIsAlive(_ pid: Int32) -> Bool {
    kill(pid, 0) == 0 || errno == EPERM
}

using System.Runtime.InteropServices;
using System.Runtime.Versioning;

namespace MergeLab.Benchmarks;

/// <summary>Drops files from Linux's page cache, so that the next read of them goes to the disk.</summary>
[SupportedOSPlatform("linux")]
internal static partial class PageCache
{
    private const int DontNeed = 4; // POSIX_FADV_DONTNEED

    /// <summary>Writes back any dirty pages of each file, then asks the kernel to drop its cached pages
    /// (<c>posix_fadvise(POSIX_FADV_DONTNEED)</c>; pages another process has mapped stay).</summary>
    public static void Drop(IEnumerable<string> files)
    {
        foreach (var file in files)
        {
            using var handle = File.OpenHandle(file, FileMode.Open, FileAccess.Read);
            int fd = (int)handle.DangerousGetHandle();
            if (FDataSync(fd) != 0)
            {
                throw new IOException($"Could not write back {file} (errno {Marshal.GetLastPInvokeError()}).");
            }

            int error = FAdvise(fd, 0, 0, DontNeed);
            if (error != 0)
            {
                throw new IOException($"Could not drop {file} from the page cache (errno {error}).");
            }
        }
    }

    [LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    private static partial int FDataSync(int fd);

    // posix_fadvise returns the error number itself (it does not set errno).
    [LibraryImport("libc", EntryPoint = "posix_fadvise")]
    private static partial int FAdvise(int fd, long offset, long length, int advice);
}

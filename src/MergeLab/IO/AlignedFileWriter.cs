using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace MergeLab.IO;

/// <summary>
/// Writes a file of known length whose every byte is written exactly once, in any order, as whole
/// aligned blocks, so the file can be opened for direct I/O (<c>O_DIRECT</c>): the bytes go from the
/// caller's memory where it is aligned as the file's blocks, else from a warm staging buffer, to the device
/// instead of being copied into freshly allocated page-cache pages, which on a virtual machine costs more
/// than the merge that produced them. Bytes that share a block with
/// bytes not yet written wait in a small block buffer until the block is complete. Where the file system
/// refuses direct I/O the file is opened normally and written the same way.
/// </summary>
/// <remarks>Not thread-safe; the caller writes from one thread at a time.</remarks>
internal sealed unsafe class AlignedFileWriter : IDisposable
{
    /// <summary>The alignment of every write's offset, length and memory: 4 KiB, the largest logical block
    /// size of common devices, and the buffer pool's alignment, so that results it places start on a block.</summary>
    public const int BlockSize = Selection.NativeBufferPool.Alignment;

    private static long _inPlaceBytes;

    private readonly Dictionary<long, (nint Data, int Filled)> _partial = [];
    private readonly long _length;

    private AlignedFileWriter(SafeFileHandle handle, long length)
    {
        Handle = handle;
        _length = length;
    }

    /// <summary>Bytes written by every instance straight from the caller's memory, without the staging
    /// copy (for tests).</summary>
    internal static long InPlaceBytes => Interlocked.Read(ref _inPlaceBytes);

    /// <summary>The open file.</summary>
    public SafeFileHandle Handle { get; }

    /// <summary>Creates <paramref name="path"/> (which must not exist) with <paramref name="length"/> bytes
    /// reserved on disk where the file system supports it, switched to direct I/O where allowed.</summary>
    public static AlignedFileWriter Create(string path, long length)
    {
        var handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, FileOptions.None, preallocationSize: length);
        try
        {
            RandomAccess.SetLength(handle, length);
            TrySetDirect(handle);
            return new AlignedFileWriter(handle, length);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Writes <paramref name="bytes"/> at <paramref name="offset"/>; whole blocks go out at once,
    /// from <paramref name="bytes"/> itself where they start on a <see cref="BlockSize"/> boundary of memory,
    /// else through <paramref name="staging"/> (<see cref="BlockSize"/>-aligned, <paramref name="stagingBytes"/>
    /// long, a multiple of <see cref="BlockSize"/>).</summary>
    public void Write(ReadOnlySpan<byte> bytes, long offset, byte* staging, int stagingBytes)
    {
        while (!bytes.IsEmpty)
        {
            long block = offset / BlockSize;
            int within = (int)(offset % BlockSize);
            long blockStart = block * BlockSize;
            if (within == 0 && bytes.Length >= BlockSize)
            {
                // Whole blocks, none of them the file's short last block (the bytes end inside the file):
                // straight from the caller's memory where it is aligned as a block (a result placed for
                // this offset, CpuTensors.PlaceResults), else through the staging buffer.
                int n = bytes.Length / BlockSize * BlockSize;
                fixed (byte* start = bytes)
                {
                    // Pinned while checked and written: managed bytes (a header) could move in between.
                    if (((nint)start & (BlockSize - 1)) == 0)
                    {
                        RandomAccess.Write(Handle, new ReadOnlySpan<byte>(start, n), blockStart);
                        Interlocked.Add(ref _inPlaceBytes, n);
                    }
                    else
                    {
                        n = Math.Min(n, stagingBytes);
                        bytes[..n].CopyTo(new Span<byte>(staging, n));
                        RandomAccess.Write(Handle, new ReadOnlySpan<byte>(staging, n), blockStart);
                    }
                }

                bytes = bytes[n..];
                offset += n;
                continue;
            }

            int blockLength = (int)Math.Min(BlockSize, _length - blockStart);
            int take = Math.Min(bytes.Length, blockLength - within);
            if (!_partial.TryGetValue(block, out var partial))
            {
                partial = ((nint)NativeMemory.AlignedAlloc(BlockSize, BlockSize), 0);
                NativeMemory.Clear((void*)partial.Data, BlockSize);
            }

            bytes[..take].CopyTo(new Span<byte>((byte*)partial.Data + within, take));
            partial.Filled += take;
            if (partial.Filled == blockLength)
            {
                _partial.Remove(block);
                try
                {
                    // The file's short last block is written whole (zero-padded), then cut back.
                    RandomAccess.Write(Handle, new ReadOnlySpan<byte>((void*)partial.Data, BlockSize), blockStart);
                    if (blockLength < BlockSize)
                    {
                        RandomAccess.SetLength(Handle, _length);
                    }
                }
                finally
                {
                    NativeMemory.AlignedFree((void*)partial.Data);
                }
            }
            else
            {
                _partial[block] = partial;
            }

            bytes = bytes[take..];
            offset += take;
        }
    }

    /// <summary>Whether bytes are still waiting for the rest of their block (some byte was never written).</summary>
    public bool HasPendingBytes => _partial.Count > 0;

    /// <summary>Closes the file and frees the block buffers.</summary>
    public void Dispose()
    {
        Handle.Dispose();
        foreach (var (data, _) in _partial.Values)
        {
            NativeMemory.AlignedFree((void*)data);
        }

        _partial.Clear();
    }

    /// <summary>Turns on <c>O_DIRECT</c> where it can (Linux only: <c>fcntl(F_SETFL)</c>; .NET has no option
    /// for it there). Where the file system refuses it (tmpfs), or elsewhere, the file stays buffered:
    /// the writes are the same either way, only slower or faster.</summary>
    private static void TrySetDirect(SafeFileHandle handle)
    {
        int direct = RuntimeInformation.ProcessArchitecture switch
        {
            Architecture.X64 or Architecture.X86 => 0x4000,
            Architecture.Arm64 or Architecture.Arm => 0x10000,
            _ => 0,
        };
        if (!OperatingSystem.IsLinux() || direct == 0)
        {
            return;
        }

        try
        {
            int fd = (int)handle.DangerousGetHandle();
            int flags = Fcntl(fd, GetFlags, 0);
            if (flags >= 0)
            {
                _ = Fcntl(fd, SetFlags, flags | direct); // refused: stays buffered
            }
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            // No libc fcntl: stays buffered.
        }
    }

    private const int GetFlags = 3; // F_GETFL
    private const int SetFlags = 4; // F_SETFL

    [DllImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static extern int Fcntl(int fd, int command, int argument);
}

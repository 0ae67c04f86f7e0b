using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using NUnit.Framework;

namespace MergeLab.Tests.Reliability;

/// <summary>One generated input: the files it consists of (name → bytes) and how it was made.</summary>
/// <param name="Files">A single file for the file and config targets; a whole checkpoint folder for
/// the index target (a file left out of the folder is a deleted file).</param>
/// <param name="Recipe">The mutations applied, for the failure report.</param>
internal sealed record FuzzCase(IReadOnlyDictionary<string, byte[]> Files, string Recipe)
{
    public static FuzzCase Single(string fileName, byte[] bytes, string recipe) =>
        new(new Dictionary<string, byte[]>(StringComparer.Ordinal) { [fileName] = bytes }, recipe);

    public long TotalBytes => Files.Values.Sum(b => (long)b.Length);
}

/// <summary>
/// Counts the managed bytes allocated on the current thread inside <see cref="Measure"/>, so a fuzz
/// target can measure the code under test and leave out its oracle (assertion messages allocate).
/// </summary>
internal sealed class AllocationMeter
{
    public long Bytes { get; private set; }

    public void Measure(Action action)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        try
        {
            action();
        }
        finally
        {
            Bytes += GC.GetAllocatedBytesForCurrentThread() - before;
        }
    }

    public T Measure<T>(Func<T> func)
    {
        T result = default!;
        Measure(() => { result = func(); });
        return result;
    }
}

/// <summary>How one input ended: loaded, or refused with the format error (its first words, for the tally).</summary>
internal enum FuzzOutcome
{
    Loaded,
    Refused,
}

/// <summary>
/// Runs a fuzz target over seeded inputs with an iteration and a time budget, a per-input timeout
/// (watchdog) and a per-input managed-allocation bound, and saves every failing input for the
/// regression corpus.
/// </summary>
/// <remarks>
/// <para>Input i of a target is generated from <c>new Random(seed * 1_000_003 + i)</c>, so any single
/// input can be reproduced on its own (<c>MERGELAB_FUZZ_ONLY=i</c>) and the inputs run within a
/// time budget are always a prefix of the same sequence.</para>
/// <para>Environment: <c>MERGELAB_FUZZ_ITERATIONS</c> (inputs per target), <c>MERGELAB_FUZZ_SECONDS</c>
/// (time budget per target), <c>MERGELAB_FUZZ_SEED</c>, <c>MERGELAB_FUZZ_ONLY</c>. Failing inputs are
/// written under <c>fuzz-failures/</c> in the test output folder; copy them into
/// <c>tests/MergeLab.Tests/Reliability/Regressions/</c> to keep them.</para>
/// </remarks>
internal static class FuzzHarness
{
    public const int DefaultSeed = 20_240_611;

    /// <summary>An input that takes longer than this is reported as a hang.</summary>
    public static readonly TimeSpan InputTimeout = TimeSpan.FromSeconds(10);

    private const int MaxFailuresReported = 20;

    public static int Seed => EnvInt("MERGELAB_FUZZ_SEED") ?? DefaultSeed;

    /// <summary>Whether the budget is the tests' own (no MERGELAB_FUZZ_* override): only then do the
    /// tests insist on a minimum number of inputs and outcomes.</summary>
    public static bool DefaultBudget =>
        EnvInt("MERGELAB_FUZZ_ITERATIONS") is null && EnvInt("MERGELAB_FUZZ_SECONDS") is null && EnvInt("MERGELAB_FUZZ_ONLY") is null;

    /// <summary>Runs <paramref name="check"/> on inputs from <paramref name="generate"/> and fails the
    /// test (after saving the inputs) if any input throws an exception that <paramref name="isFormatError"/>
    /// does not accept, breaks an invariant (an <see cref="AssertionException"/> from
    /// <paramref name="check"/>), allocates more than <paramref name="allocationBound"/> managed bytes, or
    /// hangs.</summary>
    /// <param name="target">A short name, used for the failure folder.</param>
    /// <param name="defaultIterations">Inputs to run when <c>MERGELAB_FUZZ_ITERATIONS</c> is not set.</param>
    /// <param name="defaultBudget">Time budget when <c>MERGELAB_FUZZ_SECONDS</c> is not set.</param>
    /// <param name="generate">Makes input <c>i</c> from its own seeded generator.</param>
    /// <param name="check">Loads the input, measuring the code under test with the meter; returns
    /// normally when it loaded and passed the oracle.</param>
    /// <param name="isFormatError">Whether an exception is the component's own format error.</param>
    /// <param name="allocationBound">The most managed bytes the measured code may allocate for an input.</param>
    public static FuzzSummary Run(string target, int defaultIterations, TimeSpan defaultBudget,
        Func<Random, FuzzCase> generate, Action<FuzzCase, AllocationMeter> check, Func<Exception, bool> isFormatError,
        Func<FuzzCase, long> allocationBound)
    {
        int iterations = EnvInt("MERGELAB_FUZZ_ITERATIONS") ?? defaultIterations;
        var budget = EnvInt("MERGELAB_FUZZ_SECONDS") is int s ? TimeSpan.FromSeconds(s) : defaultBudget;
        int? only = EnvInt("MERGELAB_FUZZ_ONLY");
        int seed = Seed;

        var summary = new FuzzSummary(target);
        var failures = new List<string>();
        // The index and start time of the input in flight, for the watchdog; -1 when none.
        long current = -1;
        long currentStart = 0;
        FuzzCase? currentCase = null;
        var clock = Stopwatch.StartNew();

        var worker = new Thread(() =>
        {
            for (int i = only ?? 0; i < (only + 1 ?? iterations); i++)
            {
                if (only is null && clock.Elapsed > budget)
                {
                    break;
                }

                FuzzCase input;
                try
                {
                    input = generate(new Random(unchecked(seed * 1_000_003 + i)));
                }
                catch (Exception e)
                {
                    // A bug in the mutator: report it rather than crash the test host.
                    lock (failures)
                    {
                        failures.Add($"  input {i}: the generator failed: {e}");
                    }

                    break;
                }

                Volatile.Write(ref currentCase, input);
                Volatile.Write(ref currentStart, Stopwatch.GetTimestamp());
                Volatile.Write(ref current, i);
                string? failure = RunOne(input, check, isFormatError, allocationBound, summary);
                Volatile.Write(ref current, -1);
                if (failure is not null)
                {
                    lock (failures)
                    {
                        failures.Add(Save(target, i, input, failure));
                        if (failures.Count >= MaxFailuresReported)
                        {
                            break;
                        }
                    }
                }

                summary.Iterations++;
            }
        }, maxStackSize: 16 << 20)
        { IsBackground = true, Name = $"fuzz {target}" };

        worker.Start();
        while (!worker.Join(TimeSpan.FromMilliseconds(50)))
        {
            long i = Volatile.Read(ref current);
            if (i >= 0 && Stopwatch.GetElapsedTime(Volatile.Read(ref currentStart)) > InputTimeout && Volatile.Read(ref current) == i)
            {
                // The worker is stuck; it is a background thread and is abandoned with the test.
                lock (failures)
                {
                    failures.Add(Save(target, (int)i, Volatile.Read(ref currentCase)!, $"hang: no result after {InputTimeout.TotalSeconds} s"));
                }

                break;
            }
        }

        summary.Elapsed = clock.Elapsed;
        TestContext.Out.WriteLine(summary.ToString());
        lock (failures)
        {
            if (failures.Count > 0)
            {
                Assert.Fail($"{failures.Count} failing input(s) of '{target}' (seed {seed}); saved for the regression corpus:\n" +
                    string.Join("\n", failures));
            }
        }

        return summary;
    }

    /// <summary>Runs one input; returns a description of the failure, or null.</summary>
    internal static string? RunOne(FuzzCase input, Action<FuzzCase, AllocationMeter> check, Func<Exception, bool> isFormatError,
        Func<FuzzCase, long> allocationBound, FuzzSummary? summary)
    {
        var meter = new AllocationMeter();
        FuzzOutcome outcome;
        string? refusal = null;
        try
        {
            check(input, meter);
            outcome = FuzzOutcome.Loaded;
        }
        catch (AssertionException e)
        {
            return $"oracle: {e.Message}";
        }
        catch (Exception e) when (isFormatError(e))
        {
            outcome = FuzzOutcome.Refused;
            refusal = e.Message;
        }
        catch (Exception e)
        {
            return $"unexpected {e.GetType().FullName}: {e.Message}\n{e.StackTrace}";
        }

        long allocated = meter.Bytes;
        long bound = allocationBound(input);
        if (allocated > bound)
        {
            return $"allocation: {allocated} managed bytes for a {input.TotalBytes}-byte input, above the bound of {bound} ({outcome}: {refusal})";
        }

        summary?.Count(outcome, refusal, allocated, input.TotalBytes);
        return null;
    }

    private static string Save(string target, int index, FuzzCase input, string failure)
    {
        string dir = Path.Combine(TestContext.CurrentContext.WorkDirectory, "fuzz-failures",
            string.Create(CultureInfo.InvariantCulture, $"{target}-{Seed}-{index}"));
        Directory.CreateDirectory(dir);
        foreach (var (name, bytes) in input.Files)
        {
            File.WriteAllBytes(Path.Combine(dir, name), bytes);
        }

        File.WriteAllText(Path.Combine(dir, "FAILURE.txt"), $"{input.Recipe}\n{failure}\n");
        return $"  input {index} ({input.Recipe}) -> {dir}\n    {failure.Split('\n')[0]}";
    }

    private static int? EnvInt(string name) =>
        int.TryParse(Environment.GetEnvironmentVariable(name), NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) ? v : null;
}

/// <summary>What a fuzz run did: inputs run, loaded and refused, by refusal reason, and allocation ratios.</summary>
internal sealed class FuzzSummary(string target)
{
    private readonly Dictionary<string, int> _reasons = new(StringComparer.Ordinal);

    public int Iterations { get; set; }

    public int Loaded { get; private set; }

    public int Refused { get; private set; }

    public TimeSpan Elapsed { get; set; }

    /// <summary>Inputs at least this large count towards <see cref="MaxAllocationRatio"/> (for smaller
    /// ones the fixed costs dominate the ratio).</summary>
    public const long LargeInput = 64 << 10;

    /// <summary>The most managed bytes allocated per input byte, over inputs of at least <see cref="LargeInput"/> bytes.</summary>
    public double MaxAllocationRatio { get; private set; }

    /// <summary>The most managed bytes allocated for one input.</summary>
    public long MaxAllocated { get; private set; }

    public void Count(FuzzOutcome outcome, string? refusal, long allocated, long inputBytes)
    {
        lock (_reasons)
        {
            if (outcome == FuzzOutcome.Loaded)
            {
                Loaded++;
            }
            else
            {
                Refused++;
                string key = Reason(refusal ?? "");
                _reasons[key] = _reasons.GetValueOrDefault(key) + 1;
            }

            MaxAllocated = Math.Max(MaxAllocated, allocated);
            if (inputBytes >= LargeInput)
            {
                MaxAllocationRatio = Math.Max(MaxAllocationRatio, (double)allocated / inputBytes);
            }
        }
    }

    public int DistinctReasons => _reasons.Count;

    public override string ToString()
    {
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture,
            $"fuzz {target}: {Iterations} inputs in {Elapsed.TotalSeconds:0.0} s, {Loaded} loaded, {Refused} refused ({_reasons.Count} distinct reasons); " +
            $"managed allocation at most {MaxAllocated / 1e6:0.0} MB for one input and {MaxAllocationRatio:0.0} bytes per byte of inputs over {LargeInput >> 10} KiB");
        foreach (var (reason, count) in _reasons.OrderByDescending(kv => kv.Value).Take(25))
        {
            sb.Append(CultureInfo.InvariantCulture, $"\n  {count,6}  {reason}");
        }

        return sb.ToString();
    }

    /// <summary>The refusal message without its variable parts (path, quoted names, numbers), so similar refusals count together.</summary>
    private static string Reason(string message)
    {
        int colon = message.IndexOf(": ", StringComparison.Ordinal);
        string problem = colon >= 0 && message.StartsWith('/') ? message[(colon + 2)..] : message;
        problem = Regex.Replace(problem, "'[^']*'", "'…'");
        problem = Regex.Replace(problem, "[0-9]+", "#");
        return problem.Length > 90 ? problem[..90] : problem;
    }
}

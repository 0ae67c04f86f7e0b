using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Runtime.CompilerServices;
using MergeLab.Config;
using MergeLab.Engine;
using MergeLab.IO;
using Spectre.Console;
using TorchSharp;

namespace MergeLab.Cli.Commands;

/// <summary><c>mergelab merge CONFIG.yaml OUT_DIR</c>: runs a mergekit-style config through the streaming engine.</summary>
internal static class MergeCommand
{
    /// <summary>The name of the output-directory argument (also read by the second-signal handler).</summary>
    internal const string OutputArgument = "OUT_DIR";

    /// <summary>The command's name.</summary>
    public const string Name = "merge";

    public static Command Create()
    {
        var config = ConsoleOutput.NonEmpty(new Argument<string>("CONFIG") { Description = "A mergekit-style YAML merge config." });
        var output = ConsoleOutput.NonEmpty(new Argument<string>(OutputArgument) { Description = "The output directory; must not exist." });
        var device = new Option<string>("--device") { Description = "cpu, cuda or cuda:N.", DefaultValueFactory = _ => "cpu" };
        var seed = new Option<long>("--seed") { Description = "Seed for random methods (DARE).", DefaultValueFactory = _ => 0 };
        var shardSize = new Option<string>("--shard-size") { Description = "Maximum output shard size, e.g. 5GB or 500MB.", DefaultValueFactory = _ => "5GB" };
        var overwrite = new Option<bool>("--overwrite") { Description = "Replace OUT_DIR if it exists, once the new merge is complete." };
        var nonFinite = new Option<string>("--nonfinite")
        {
            Description = "Input tensors holding NaN or Inf: fail (stop, naming the tensor and file) or pass (merge them as they are).",
            DefaultValueFactory = _ => "fail",
        };
        nonFinite.AcceptOnlyFromAmong("fail", "pass");
        var read = new Option<string>("--read")
        {
            Description = "How input tensors are read for a CPU merge: map (memory-mapped, no copy; fastest, but an input file cut short "
                + "during the merge stops the process) or copy (read into memory; a change to an input is reported as an error).",
            DefaultValueFactory = _ => "map",
        };
        read.AcceptOnlyFromAmong("map", "copy");
        var command = new Command(Name, "Merge the models of a YAML config into OUT_DIR (safetensors shards, index, config and tokenizer files).")
        {
            config, output, device, seed, shardSize, overwrite, nonFinite, read,
        };
        command.SetAction((parse, ct) => Task.FromResult(ConsoleErrors.Run(() => Merge(
            parse.GetValue(config)!, parse.GetValue(output)!, parse.GetValue(device)!, parse.GetValue(seed),
            parse.GetValue(shardSize)!, parse.GetValue(overwrite),
            parse.GetValue(nonFinite) == "pass" ? NonFiniteInputs.Pass : NonFiniteInputs.Fail, parse.GetValue(read) == "map", ct))));
        return command;
    }

    private static int Merge(string configPath, string output, string deviceName, long seed, string shardSize, bool overwrite,
        NonFiniteInputs nonFinite, bool mapInputs, CancellationToken ct)
    {
        long maxShard = ConsoleOutput.ParseSize(shardSize);
        var device = ParseDevice(deviceName);
        Task? loading = null;
        if (device.type == DeviceType.CPU)
        {
            // Loading libtorch (about a quarter of a second of its static initialisation) overlaps reading the
            // config and the inputs' headers; a failure here is left to the merge to report. Its initialisers
            // run under the dynamic loader's lock, and a thread that meanwhile binds a native function (the
            // first call of a P/Invoke: the culture data, file I/O) waits for all of them: reading the config
            // did so in some runs here (0.26 s instead of 0.06 s). Those bindings come first, made by the
            // calls the config's loading makes, on a small file of the tool's own (the config itself would
            // then be read twice). Where that file is absent (a single-file build) the bindings come later.
            _ = CultureInfo.CurrentCulture.CompareInfo.Compare("a", "B", CompareOptions.IgnoreCase);
            try
            {
                var own = new FileInfo(Path.Combine(AppContext.BaseDirectory, "MergeLab.Cli.runtimeconfig.json"));
                _ = own.Exists && own.Length > 0 ? File.ReadAllText(own.FullName) : null;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Only a warm-up: the bindings are then made by the config's loading.
            }

            _ = Directory.Exists(output);
            loading = Task.Run(() => torch.TryInitializeDeviceType(DeviceType.CPU));
        }

        var config = MergeConfig.Load(configPath);
        var plan = MergePlan.Create(config, seed);
        if (loading is not null)
        {
            _ = CompileAhead(loading);
        }
        var request = new CheckpointMergeRequest
        {
            BaseModel = plan.BaseModelPath,
            Experts = plan.ExpertPaths,
            Method = plan.Method,
            MethodForTensor = plan.MethodFor,
            OutputDirectory = output,
            Overwrite = overwrite,
            OutputDType = plan.OutputDType,
            MaxShardBytes = maxShard,
            TokenizerFilesFrom = plan.TokenizerSource,
            Device = device,
            NonFinite = nonFinite,
            MapInputs = mapInputs,
        };

        NoteLeftovers(output);
        var clock = Stopwatch.StartNew();
        CheckpointMergeResult result = ConsoleOutput.Interactive
            ? AnsiConsole.Progress()
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn())
                .Start(ctx =>
                {
                    using var live = new LiveProgress(ctx);
                    return CheckpointMerger.Merge(request, live, ct);
                })
            : CheckpointMerger.Merge(request, new LineProgress(), ct);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"Merged {result.TensorCount} tensors ({ConsoleOutput.Bytes(result.BytesWritten)}) into {result.OutputDirectory} in {clock.Elapsed.TotalSeconds:0.0} s."));
        if (!result.Files.Contains("config.json", StringComparer.OrdinalIgnoreCase))
        {
            // mergekit stops without a config to copy; MergeLab writes the weights anyway (they may not be
            // for a Hugging Face model), but says so.
            Console.Error.WriteLine("mergelab: note: the output has no config.json, because the model its other files come from "
                + "(base_model, else the first model) has none; Hugging Face loaders need one.");
        }

        return 0;
    }

    /// <summary>Says on standard error which folders merges into <paramref name="output"/> left behind
    /// (<see cref="CheckpointMerger.FindLeftovers"/>) and how much room they take; they are not deleted,
    /// since another merge into the same folder may be writing one.</summary>
    private static void NoteLeftovers(string output)
    {
        foreach (var leftover in CheckpointMerger.FindLeftovers(output))
        {
            long bytes = 0;
            try
            {
                bytes = new DirectoryInfo(leftover.Path).EnumerateFiles("*", SearchOption.AllDirectories).Sum(f => f.Length);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // The size is only for the note.
            }

            Console.Error.WriteLine(leftover.IsPreviousOutput
                ? $"mergelab: note: '{leftover.Path}' ({ConsoleOutput.Bytes(bytes)}) is an earlier output of this folder that an --overwrite "
                    + "merge moved aside and could not move back; move it back or delete it, unless a merge into the same folder is still running."
                : $"mergelab: note: '{leftover.Path}' ({ConsoleOutput.Bytes(bytes)}) is the unfinished output of a merge into "
                    + "the same folder that was stopped at once; delete it to free the space, unless that merge is still running.");
        }
    }

    /// <summary>
    /// Until <paramref name="loading"/> completes, compiles <see cref="MethodsToCompileAhead"/>. The merge
    /// needs libtorch from its first tensor on, so until libtorch is loaded this thread would only wait
    /// (about 0.13 s here); the compiler needs no native binding, so it does not wait on the loader's lock.
    /// About 800 methods fit, and a small merge then ends about 30 ms sooner. Only an optimisation: a method
    /// that cannot be compiled ahead is skipped, and a failure to list the types or methods ends the sweep,
    /// quietly (what the merge calls is compiled, or fails, when called). Compiling may run a type's static
    /// initialiser early, as a first call would. Returns how many methods it compiled.
    /// </summary>
    internal static int CompileAhead(Task loading)
    {
        int compiled = 0;
        try
        {
            foreach (var method in MethodsToCompileAhead())
            {
                if (loading.IsCompleted)
                {
                    return compiled;
                }

                try
                {
                    RuntimeHelpers.PrepareMethod(method.MethodHandle);
                    compiled++;
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    // This one is compiled, or fails, when called.
                }
            }
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // Types or methods that cannot be listed: the merge compiles what it calls anyway.
        }

        return compiled;
    }

    /// <summary>The methods with a body, neither abstract nor generic, of the library's engine, reading,
    /// selection, merging and tensor namespaces, in metadata order (much of what a merge calls first).</summary>
    internal static IEnumerable<MethodInfo> MethodsToCompileAhead()
    {
        const BindingFlags all = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;
        string[] namespaces = ["MergeLab.Engine", "MergeLab.IO", "MergeLab.Selection", "MergeLab.Methods", "MergeLab.Tensors"];
        return typeof(CheckpointMerger).Assembly.GetTypes()
            .Where(type => !type.ContainsGenericParameters && namespaces.Contains(type.Namespace))
            .SelectMany(type => type.GetMethods(all))
            .Where(method => !method.IsAbstract && !method.ContainsGenericParameters && method.GetMethodBody() is not null);
    }

    private static torch.Device ParseDevice(string name)
    {
        torch.Device device;
        try
        {
            device = new torch.Device(name);
        }
        catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
        {
            // TorchSharp's parser throws FormatException for an index that is not a number (cuda:x).
            throw new ArgumentException($"--device {name}: not a device; use cpu, cuda or cuda:N.");
        }

        if (device.type == DeviceType.CUDA && !torch.cuda.is_available())
        {
            throw new ArgumentException($"--device {name}: CUDA is not available (this build references TorchSharp-cpu, or no GPU is present).");
        }

        return device;
    }

    /// <summary>
    /// Each pass's rate and time left, measured from where the pass began: the end of the pass before it
    /// (or the merge's start). The engine first reports a pass when its first tensor is done, so a clock
    /// started at that report would credit the first tensor's bytes to no time at all (Spectre's own speed
    /// column showed TiB/s for a moment at the start of every pass). Between reports (one large tensor can
    /// take a minute), <see cref="Tick"/> counts the time left down from the last one.
    /// </summary>
    internal sealed class PassClock
    {
        private readonly Func<TimeSpan> _now;
        private (string, int) _pass;
        private TimeSpan _passStart, _lastReport;
        private double _rate, _eta;

        /// <summary>A clock that starts now.</summary>
        public PassClock()
        {
            var clock = Stopwatch.StartNew();
            _now = () => clock.Elapsed;
        }

        /// <summary>A clock reading <paramref name="now"/>, the time since the merge started (for tests).</summary>
        internal PassClock(Func<TimeSpan> now) => _now = now;

        /// <summary>Records a report; returns true when it is the first of a new pass.</summary>
        public bool Observe(CheckpointMergeProgress p)
        {
            bool first = _pass != (p.Stage, p.Pass);
            if (first)
            {
                (_pass, _passStart) = ((p.Stage, p.Pass), _lastReport);
            }

            _lastReport = _now();
            return first;
        }

        /// <summary>"1.23 GB/s, ETA 00:00:12" for the current pass, as of the report just observed: the
        /// pass's input bytes per second so far and the time left at that rate, both kept for
        /// <see cref="Tick"/> to count down from.</summary>
        public string Describe(long bytesDone, long bytesTotal)
        {
            _rate = bytesDone / Math.Max((_now() - _passStart).TotalSeconds, 1e-3);
            _eta = _rate > 0 ? (bytesTotal - bytesDone) / _rate : 0;
            return Format(_rate, _eta);
        }

        /// <summary>As <see cref="Describe"/> said at the last report, with the time left less the time
        /// since that report (down to 0).</summary>
        public string Tick() => Format(_rate, Math.Max(0, _eta - (_now() - _lastReport).TotalSeconds));

        private static string Format(double rate, double eta)
        {
            // A pass that has read almost nothing yet can predict any time at all; beyond 100 days, say so.
            string left = eta < 100 * 86_400 ? TimeSpan.FromSeconds(Math.Round(eta)).ToString("c", CultureInfo.InvariantCulture) : "--:--:--";
            return string.Create(CultureInfo.InvariantCulture, $"{rate / 1e9:0.00} GB/s, ETA {left}");
        }
    }

    /// <summary>A Spectre progress bar per pass: bytes read of the pass, then its rate and time left, the
    /// time left counted down every second between the engine's reports.</summary>
    private sealed class LiveProgress : IProgress<CheckpointMergeProgress>, IDisposable
    {
        private readonly ProgressContext _context;
        private readonly PassClock _clock = new();
        private readonly Lock _gate = new();
        private readonly Timer _timer;
        private ProgressTask? _task;
        private string _label = "";
        private bool _stopped;

        public LiveProgress(ProgressContext context)
        {
            _context = context;
            _timer = new Timer(_ => Tick(), null, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(1));
        }

        public void Report(CheckpointMergeProgress p)
        {
            lock (_gate)
            {
                _label = Label(p);
                if (_clock.Observe(p) || _task is null)
                {
                    _task?.StopTask();
                    _task = _context.AddTask(_label, maxValue: Math.Max(p.BytesTotal, 1));
                }

                _task.Description = $"{_label}  {_clock.Describe(p.BytesDone, p.BytesTotal)}";
                _task.Value = p.BytesDone;
            }
        }

        public void Dispose()
        {
            lock (_gate)
            {
                _stopped = true; // a tick already under way leaves the bar as it is
            }

            _timer.Dispose();
        }

        private void Tick()
        {
            lock (_gate)
            {
                if (_task is not null && !_stopped)
                {
                    _task.Description = $"{_label}  {_clock.Tick()}";
                }
            }
        }

        private static string Label(CheckpointMergeProgress p) =>
            p.Stage == "merge" ? $"merge {p.TensorsDone}/{p.TensorCount} tensors" : $"statistics pass {p.Pass} {p.TensorsDone}/{p.TensorCount}";
    }

    /// <summary>Plain progress lines for redirected output: one per tenth of each pass.</summary>
    private sealed class LineProgress : IProgress<CheckpointMergeProgress>
    {
        private readonly PassClock _clock = new();
        private int _nextTenth;

        public void Report(CheckpointMergeProgress p)
        {
            if (_clock.Observe(p))
            {
                _nextTenth = 1;
            }

            if (p.TensorsDone * 10 < _nextTenth * p.TensorCount && p.TensorsDone != p.TensorCount)
            {
                return;
            }

            _nextTenth = p.TensorsDone * 10 / p.TensorCount + 1;
            Console.WriteLine($"{p.Stage} pass {p.Pass}: {p.TensorsDone}/{p.TensorCount} tensors, {_clock.Describe(p.BytesDone, p.BytesTotal)}");
        }
    }
}

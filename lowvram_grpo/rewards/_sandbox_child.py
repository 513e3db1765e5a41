"""The sandbox's launcher: runs in the child process, confines itself, then execs the program.

Started by `sandbox.run_program` as `python -I -S _sandbox_child.py SPEC.json` in a new session
(its own process group), with an empty environment. Standard library only, and no import of
lowvram_grpo: it must start fast and must not read the trainer's state. Steps, in order:

1. Read the spec and the program's files while they are still visible.
2. Enter new namespaces where the OS allows: network (no interface but a down loopback: no
   connection anywhere), PID (when the program ends or is killed the kernel kills every process
   it left behind), mount (so the file-system changes below stay private). As root that needs
   no user namespace; as another user it needs one (unprivileged user namespaces).
3. In the mount namespace: every mount read-only, fresh size-limited tmpfs on /tmp, /var/tmp
   and /dev/shm (the working directory lives in the new /tmp), empty home directories (/root,
   /home: no tokens or keys to read) except the Python installation the program runs with, and
   a /proc of the new PID namespace (the trainer's processes are not even listed).
4. Resource limits (CPU seconds, address space, processes, open files, file size, no core
   dumps), then, when root, a switch to an unprivileged uid of our own: RLIMIT_NPROC does not
   bind root, and an unprivileged uid cannot write the machine's files. no_new_privs stops a
   setuid binary (sudo, su) from giving privileges back.
5. exec the program. Nothing is inherited but stdin/stdout/stderr.

With `"probe": true` in the spec it prints what held as JSON instead of running a program.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
MOUNT_OPTION_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                      "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")
WORKDIR = "/tmp/work"

libc = ctypes.CDLL(None, use_errno=True)


def fail(message):
    sys.stderr.write(f"sandbox: {message}\n")
    os._exit(125)


def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                     ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def enter_namespaces(held):
    """Unshare network, PID and mount namespaces; as a non-root user inside a user namespace."""
    wanted = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS
    uid, gid = os.getuid(), os.getgid()
    attempts = [wanted] if uid == 0 else []
    attempts.append(wanted | CLONE_NEWUSER)
    for flags in attempts:
        if libc.unshare(ctypes.c_int(flags)) == 0:
            if flags & CLONE_NEWUSER:
                # Be "root" inside, mapped to our own uid outside: enough to mount and to own
                # the namespaces, and no more than our own rights on the machine's files.
                with open("/proc/self/setgroups", "w") as f:
                    f.write("deny")
                with open("/proc/self/uid_map", "w") as f:
                    f.write(f"0 {uid} 1")
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"0 {gid} 1")
                held["user_namespace"] = True
            held.update(network_namespace=True, pid_namespace=True, mount_namespace=True)
            return
    # Each one alone, for kernels or containers that refuse the combination.
    for key, flag in (("network_namespace", CLONE_NEWNET), ("pid_namespace", CLONE_NEWPID),
                      ("mount_namespace", CLONE_NEWNS)):
        if uid == 0 and libc.unshare(ctypes.c_int(flag)) == 0:
            held[key] = True


def private_file_system(tmp_bytes, hidden, exposed, held):
    """Everything read-only but a fresh tmpfs on /tmp (holding the working directory) and the
    other world-writable places; `hidden` directories replaced by empty ones, except for the
    `exposed` paths inside them (the Python installation); a /proc of this PID namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    read_only = True
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in sorted(mounts, key=lambda m: len(m[4])):
        target = fields[4].replace("\\040", " ")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):  # keep the mount's own flags (a user namespace must)
            flags |= MOUNT_OPTION_FLAGS.get(option, 0)
        try:
            mount(None, target, None, flags)
        except OSError:
            if target == "/" or target.startswith(("/home", "/root", "/work", "/content", "/mnt", "/opt", "/srv")):
                read_only = False
    held["read_only_root"] = read_only
    hidden = [h for h in hidden if os.path.isdir(h)]
    covered = [t for t in PRIVATE_TMP if os.path.isdir(t)] + hidden
    # What must stay visible under a directory about to be covered (the Python installation,
    # in a home or in /tmp when the project lives there): held open, then bound back in place.
    keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in exposed
            if os.path.isdir(path) and any(path == c or path.startswith(c.rstrip("/") + "/") for c in covered)}
    for target in PRIVATE_TMP:
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777")
    held["private_tmp"] = True
    for home in hidden:
        mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path, fd in keep.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(fd)
    for home in hidden:
        mount(None, home, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    held["hidden_homes"] = True
    if held.get("pid_namespace"):
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            held["private_proc"] = True
        except OSError:
            pass


def write_files(workdir, files, uid, gid):
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
            f.write(text)
    for path in [workdir] + [os.path.join(workdir, n) for n in files]:
        os.chown(path, uid, gid)


def set_limits(limits, nproc_base):
    def limit(kind, value, hard=None):
        resource.setrlimit(kind, (value, value if hard is None else hard))

    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, limits["cpu_seconds"], limits["cpu_seconds"] + 1)  # SIGXCPU, then SIGKILL
    limit(resource.RLIMIT_AS, limits["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, limits["file_bytes"])
    limit(resource.RLIMIT_NOFILE, limits["open_files"])
    limit(resource.RLIMIT_NPROC, nproc_base + limits["processes"])


def prctl(option, value):
    zero = ctypes.c_ulong(0)
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero)


def threads_of_uid(uid):
    """Processes and threads the kernel counts against `uid`'s RLIMIT_NPROC."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                count += int(status["Threads"])
        except (OSError, ValueError, KeyError):
            continue
    return count


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    files, limits = spec["files"], spec["limits"]
    held = {"network_namespace": False, "pid_namespace": False, "mount_namespace": False,
            "user_namespace": False, "read_only_root": False, "private_tmp": False, "hidden_homes": False,
            "private_proc": False,
            "unprivileged_uid": False}
    was_root = os.getuid() == 0
    # As a normal user, RLIMIT_NPROC counts every process and thread of the user, the
    # trainer's included: count them now, while /proc still shows them all.
    nproc_base = 0 if was_root else threads_of_uid(os.getuid())
    enter_namespaces(held)
    if held["pid_namespace"]:
        # The new PID namespace starts with our next child: it becomes its init, and when it
        # ends the kernel kills everything else in the namespace.
        child = os.fork()
        if child:
            signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    uid, gid = (spec["uid"], spec["gid"]) if was_root else (os.getuid(), os.getgid())
    try:
        if held["mount_namespace"]:
            private_file_system(limits["tmp_bytes"], spec.get("hidden", []), spec.get("exposed", []), held)
            workdir = WORKDIR
        else:
            workdir = spec["workdir"]
        write_files(workdir, files, uid if was_root else os.getuid(), gid if was_root else os.getgid())
        os.chdir(workdir)
        set_limits(limits, nproc_base)
        if was_root:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            held["unprivileged_uid"] = os.getuid() != 0
        check(prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
        # Dies with the launcher (the credential change above cleared any earlier setting).
        check(prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)), "pdeathsig")
    except OSError as err:
        fail(f"setting up failed: {err}")
    if spec.get("probe"):
        print(json.dumps(held))
        sys.stdout.flush()
        os._exit(0)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    argv = spec["argv"]
    try:
        os.execve(argv[0], argv, env)
    except OSError as err:
        fail(f"cannot start {argv[0]}: {err.strerror}")


if __name__ == "__main__":
    main()

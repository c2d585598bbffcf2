"""`python -m lorakern check | tune`: test the kernels on this machine; measure the designs on this GPU."""
import os
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("check", "tune")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m lorakern {{{'|'.join(commands)}}} [options]  (--help after a command for its own)",
              file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        # no GPU: the kernels run in Triton's interpreter, which must be chosen before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if argv[0] == "check":
        from lorakern import check
        return check.main(argv[1:])
    from lorakern import tuner
    return tuner.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

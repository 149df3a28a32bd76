"""userfaultfd and guest memory: the only package that touches the kernel."""

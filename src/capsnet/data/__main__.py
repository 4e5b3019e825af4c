"""`python -m capsnet.data dataset=<name> ...`: see capsnet.data.inspect."""

from capsnet.data.inspect import main

main()

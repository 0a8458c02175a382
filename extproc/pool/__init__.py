"""The inference pool: which model server a released request goes to.

Empty until the endpoint picker lands (endpoints, discovery, picker, prefix
affinity, request bodies). It sits beside `flowcontrol`: the policy decides
which request goes next, the picker where it goes.
"""
